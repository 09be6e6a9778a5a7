"""Masked-attention transformer decoder of Mask2Former.

Each layer lets the queries cross-attend to one level of the pixel decoder's multi-scale maps (round
robin, coarse to fine), restricted to the foreground of the mask the previous layer predicted, then
self-attend, then pass a feed-forward block. Every layer's prediction (and the one from the learned
queries alone) is returned for deep supervision. Given the padding masks of the levels, the padding is
never attended and the key position embeddings count the valid pixels only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focalnet_pl.layers import MLP, MaskFormerSinePositionEmbedding

__all__ = ["MaskedAttentionDecoder"]


class _PostNormAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query: Tensor, query_pos: Tensor, key: Tensor, key_pos: Tensor, attn_mask: Tensor | None = None) -> Tensor:
        attended = self.attention(query + query_pos, key + key_pos, key, attn_mask=attn_mask, need_weights=False)[0]
        return self.norm(query + self.dropout(attended))


class _FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, dropout: float) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, hidden_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden_dim, dim)
        )
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.layers(x)))


class MaskedAttentionDecoder(nn.Module):
    """Queries -> class logits (B, Q, K + 1) and mask logits (B, Q, H/4, W/4) with masked cross-attention."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        ffn_dim: int = 2048,
        num_layers: int = 9,
        mask_dim: int = 256,
        num_feature_levels: int = 3,
        dropout: float = 0.0,
        enforce_input_projection: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.num_feature_levels = num_feature_levels
        self.position_encoding = MaskFormerSinePositionEmbedding(hidden_dim // 2)
        self.cross_attention = nn.ModuleList(_PostNormAttention(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.self_attention = nn.ModuleList(_PostNormAttention(hidden_dim, num_heads, dropout) for _ in range(num_layers))
        self.feed_forward = nn.ModuleList(_FeedForward(hidden_dim, ffn_dim, dropout) for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_features = nn.Embedding(num_queries, hidden_dim)
        self.query_positions = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_feature_levels, hidden_dim)
        projections: list[nn.Module] = []
        for _ in range(num_feature_levels):
            if in_channels != hidden_dim or enforce_input_projection:
                conv = nn.Conv2d(in_channels, hidden_dim, 1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                projections.append(conv)
            else:
                projections.append(nn.Identity())
        self.input_projections = nn.ModuleList(projections)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        for module in [*self.cross_attention, *self.self_attention]:
            for parameter in module.parameters():
                if parameter.dim() > 1:
                    nn.init.xavier_uniform_(parameter)

    def _predict(self, queries: Tensor, mask_features: Tensor, attention_size: tuple[int, int],
                 padding: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        normed = self.decoder_norm(queries)
        class_logits = self.class_embed(normed)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(normed), mask_features)
        with torch.no_grad():
            resized = F.interpolate(mask_logits.float(), size=attention_size, mode="bilinear", align_corners=False)
            # True = position may NOT be attended (outside the predicted mask); sigmoid, not the logit's
            # sign, decides as in the official code (they differ where sigmoid rounds to 0.5)
            blocked = resized.flatten(2).sigmoid() < 0.5
            if padding is not None:
                blocked = blocked | padding[:, None]
            blocked = blocked[:, None].expand(-1, self.num_heads, -1, -1).flatten(0, 1)
        return class_logits, mask_logits, blocked

    def forward(self, multi_scale_features: list[Tensor], mask_features: Tensor,
                padding_masks: list[Tensor] | None = None) -> dict:
        """``multi_scale_features``: coarse-to-fine maps (B, C, H_l, W_l); ``mask_features`` (B, D, H/4, W/4);
        ``padding_masks``: the levels' (B, H_l, W_l) masks, True at padding (None: attend to the padding too)."""
        if len(multi_scale_features) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(multi_scale_features)}")
        batch = mask_features.shape[0]
        masks = padding_masks or [None] * self.num_feature_levels
        memories, memory_positions, sizes = [], [], []
        for level, features in enumerate(multi_scale_features):
            sizes.append(tuple(features.shape[-2:]))
            memory_positions.append(self.position_encoding(features, masks[level]).flatten(2).transpose(1, 2))
            projected = self.input_projections[level](features).flatten(2).transpose(1, 2)
            memories.append(projected + self.level_embed.weight[level])
        queries = self.query_features.weight[None].expand(batch, -1, -1)
        query_positions = self.query_positions.weight[None].expand(batch, -1, -1)

        class_predictions, mask_predictions = [], []
        flat_masks = [None if mask is None else mask.flatten(1) for mask in masks]
        class_logits, mask_logits, blocked = self._predict(queries, mask_features, sizes[0], flat_masks[0])
        class_predictions.append(class_logits)
        mask_predictions.append(mask_logits)
        for layer in range(self.num_layers):
            level = layer % self.num_feature_levels
            # a query whose mask is empty may attend everywhere in the image (else softmax over nothing)
            empty = blocked.all(-1, keepdim=True)
            blocked = blocked & ~empty
            if flat_masks[level] is not None:  # ... but not the padding
                blocked = blocked | (empty & flat_masks[level].repeat_interleave(self.num_heads, 0)[:, None])
            queries = self.cross_attention[layer](queries, query_positions, memories[level], memory_positions[level], blocked)
            queries = self.self_attention[layer](queries, query_positions, queries, query_positions)
            queries = self.feed_forward[layer](queries)
            next_level = (layer + 1) % self.num_feature_levels
            class_logits, mask_logits, blocked = self._predict(queries, mask_features, sizes[next_level],
                                                               flat_masks[next_level])
            class_predictions.append(class_logits)
            mask_predictions.append(mask_logits)
        return {
            "pred_logits": class_predictions[-1],
            "pred_masks": mask_predictions[-1],
            "aux_outputs": [
                {"pred_logits": c, "pred_masks": m} for c, m in zip(class_predictions[:-1], mask_predictions[:-1])
            ],
        }

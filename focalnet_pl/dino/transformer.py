"""DINO's deformable transformer: encoder, query selection and the box-refining decoder."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from focalnet_pl.dino.box_ops import inverse_sigmoid
from focalnet_pl.layers import (
    MLP,
    DeformableEncoderLayer,
    MultiScaleDeformableAttention,
    encoder_reference_points,
    level_starts,
    spatial_shapes_list,
    spatial_shapes_tensor,
    valid_ratios,
)


def box_sine_embedding(boxes: Tensor, hidden_dim: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised ``(cx, cy, w, h)`` boxes ``(..., 4)`` -> ``(..., 2 * hidden_dim)``, in the
    boxes' dtype (the frequencies in float32 as in the official DINO; at least float32 in between)."""
    feats = hidden_dim // 2
    dim_t = torch.arange(feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * (dim_t // 2) / feats)
    scaled = boxes[..., None] * (2 * math.pi) / dim_t  # (..., 4, feats)
    embedded = torch.stack([scaled[..., 0::2].sin(), scaled[..., 1::2].cos()], dim=-1).flatten(-2)
    cx, cy, w, h = embedded.unbind(-2)
    return torch.cat([cy, cx, w, h], dim=-1).to(boxes.dtype)


class DecoderLayer(nn.Module):
    """Self-attention among queries, deformable cross-attention into the memory, FFN (post-norm)."""

    def __init__(self, hidden_dim: int, ffn_dim: int, dropout: float, heads: int, levels: int, points: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, heads, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.cross_attn = MultiScaleDeformableAttention(hidden_dim, heads, levels, points)
        self.norm2 = nn.LayerNorm(hidden_dim)
        self.ffn = nn.Sequential(
            nn.Linear(hidden_dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, hidden_dim)
        )
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, memory: Tensor, shapes: Tensor,
                starts: Tensor, memory_padding_mask: Tensor, attn_mask: Tensor | None) -> Tensor:
        q = k = tgt + query_pos
        attended = self.self_attn(q, k, tgt, attn_mask=attn_mask, need_weights=False)[0]
        tgt = self.norm1(tgt + self.dropout(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, starts, memory_padding_mask)
        tgt = self.norm2(tgt + self.dropout(attended))
        return self.norm3(tgt + self.dropout(self.ffn(tgt)))


@dataclass
class TransformerOutput:
    logits: list[Tensor]  # per decoder layer (B, N, K) class logits of the normed decoder output
    boxes: list[Tensor]  # per decoder layer, normalised (cx, cy, w, h) (B, N, 4), look-forward-twice refined
    encoder_logits: Tensor | None  # (B, num_queries, K) class logits of the selected encoder proposals
    encoder_boxes: Tensor | None  # (B, num_queries, 4) their (undetached) boxes


class DeformableTransformer(nn.Module):
    """Deformable encoder over the flattened multi-scale features and a decoder refining anchor boxes.

    ``class_head`` and ``box_head`` are the prediction heads of the decoder layers (the box refinement
    needs them inside the decoder): one pair shared by all layers (``share_heads``, the official
    DINO) or a copy per layer (detrex); the encoder proposals have their own copies.
    ``mask_padding``: the two-stage query selection never picks a padded position, and the decoder's query
    position embeddings encode the reference boxes relative to the image, not to the padded map (the
    official DINO does both on the padded map, so that a batch's padding changes an image's detections;
    the two coincide on an unpadded image).
    """

    def __init__(
        self,
        hidden_dim: int,
        num_heads: int,
        num_levels: int,
        enc_layers: int,
        dec_layers: int,
        ffn_dim: int,
        dropout: float,
        enc_points: int,
        dec_points: int,
        num_queries: int,
        num_classes: int,
        two_stage: bool,
        class_head: nn.Linear,
        box_head: MLP,
        share_heads: bool = True,
        mask_padding: bool = False,
    ) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.mask_padding = mask_padding
        self.num_levels = num_levels
        self.num_queries = num_queries
        self.two_stage = two_stage
        self.share_heads = share_heads
        encoder_layer = DeformableEncoderLayer(hidden_dim, ffn_dim, dropout, num_heads, num_levels, enc_points)
        decoder_layer = DecoderLayer(hidden_dim, ffn_dim, dropout, num_heads, num_levels, dec_points)
        self.encoder_layers = nn.ModuleList(copy.deepcopy(encoder_layer) for _ in range(enc_layers))
        self.decoder_layers = nn.ModuleList(copy.deepcopy(decoder_layer) for _ in range(dec_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.query_pos_head = MLP(2 * hidden_dim, hidden_dim, hidden_dim, 2)
        self.level_embed = nn.Parameter(torch.empty(num_levels, hidden_dim))
        self.content_queries = nn.Embedding(num_queries, hidden_dim)
        if two_stage:
            self.proposal_proj = nn.Linear(hidden_dim, hidden_dim)
            self.proposal_norm = nn.LayerNorm(hidden_dim)
        else:
            self.anchor_boxes = nn.Embedding(num_queries, 4)
        self.reset_parameters()
        # the heads keep their own init (set by the caller)
        if share_heads:
            self.class_head = class_head
            self.box_head = box_head
        else:
            self.class_heads = nn.ModuleList(copy.deepcopy(class_head) for _ in range(dec_layers))
            self.box_heads = nn.ModuleList(copy.deepcopy(box_head) for _ in range(dec_layers))
        if two_stage:
            self.proposal_class_head = copy.deepcopy(class_head)
            self.proposal_box_head = copy.deepcopy(box_head)

    def reset_parameters(self) -> None:
        """The official DINO init (``DeformableTransformer._reset_parameters``): xavier-uniform on every
        matrix (encoder and decoder layers, query-position MLP, proposal projection, content queries,
        anchors), deformable attention's own init, standard-normal level embeddings."""
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MultiScaleDeformableAttention):
                module.reset_parameters()
        nn.init.normal_(self.level_embed)

    def layer_heads(self, layer: int) -> tuple[nn.Module, nn.Module]:
        """``(class_head, box_head)`` of decoder layer ``layer``."""
        if self.share_heads:
            return self.class_head, self.box_head
        return self.class_heads[layer], self.box_heads[layer]

    def num_selected_queries(self, num_tokens: int) -> int:
        """Matching queries used for a memory of ``num_tokens`` (all of them unless the memory is smaller)."""
        return min(self.num_queries, num_tokens)

    def encoder_proposals(self, memory: Tensor, padding_mask: Tensor, shapes: Tensor) -> tuple[Tensor, Tensor]:
        """One anchor per memory position (its pixel, size 0.05 * 2**level) and the projected memory.

        Returns ``(projected memory (B, S, D), proposals in logit space (B, S, 4))``. As in the official
        DINO, a padded position or an anchor not inside ``(0.01, 0.99)`` gets zero memory and an
        infinite logit box (the whole image once refined); it is not excluded from the top-k.
        """
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (height, width) in enumerate(spatial_shapes_list(shapes)):
            level_mask = padding_mask[:, start:start + height * width].view(batch, height, width)
            valid_h = (~level_mask[:, :, 0]).sum(1).float()
            valid_w = (~level_mask[:, 0, :]).sum(1).float()
            ys, xs = torch.meshgrid(
                torch.arange(height, device=memory.device, dtype=torch.float32) + 0.5,
                torch.arange(width, device=memory.device, dtype=torch.float32) + 0.5,
                indexing="ij",
            )
            centres = torch.stack([xs, ys], -1)[None] / torch.stack([valid_w, valid_h], -1)[:, None, None]
            sizes = torch.full_like(centres, 0.05 * 2.0**level)
            proposals.append(torch.cat([centres, sizes], -1).view(batch, -1, 4))
            start += height * width
        proposals = torch.cat(proposals, 1)
        invalid = ~((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True) | padding_mask[..., None]
        logits = torch.log(proposals / (1 - proposals)).masked_fill(invalid, float("inf"))
        projected = self.proposal_norm(self.proposal_proj(memory.masked_fill(invalid, 0.0)))
        return projected, logits

    def forward(
        self,
        features: list[Tensor],
        padding_masks: list[Tensor],
        positions: list[Tensor],
        dn_content: Tensor | None,
        dn_boxes_unsigmoid: Tensor | None,
        attn_mask: Tensor | None,
    ) -> TransformerOutput:
        """``features[l] (B, D, H_l, W_l)`` with their padding masks and position embeddings."""
        shapes = spatial_shapes_tensor([f.shape[-2:] for f in features], features[0].device)
        starts = level_starts(shapes)
        src = torch.cat([f.flatten(2).transpose(1, 2) for f in features], 1)
        padding_mask = torch.cat([m.flatten(1) for m in padding_masks], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[level] for level, p in enumerate(positions)], 1
        )
        ratios = torch.stack([valid_ratios(m) for m in padding_masks], 1)  # (B, L, 2)

        memory = src
        reference_points = encoder_reference_points(shapes, ratios)
        for layer in self.encoder_layers:
            memory = layer(memory, pos, reference_points, shapes, starts, padding_mask)

        batch = memory.shape[0]
        num_select = self.num_selected_queries(memory.shape[1])
        encoder_logits = encoder_boxes = None
        if self.two_stage:
            projected, proposals = self.encoder_proposals(memory, padding_mask, shapes)
            proposal_logits = self.proposal_class_head(projected)
            proposal_boxes = self.proposal_box_head(projected) + proposals
            scores = proposal_logits.max(-1).values
            if self.mask_padding:
                scores = scores.masked_fill(padding_mask, float("-inf"))
            chosen = scores.topk(num_select, dim=1).indices
            boxes_unsigmoid = proposal_boxes.gather(1, chosen[..., None].expand(-1, -1, 4))
            encoder_logits = proposal_logits.gather(1, chosen[..., None].expand(-1, -1, proposal_logits.shape[-1]))
            encoder_boxes = boxes_unsigmoid.sigmoid()
            anchors_unsigmoid = boxes_unsigmoid.detach()
        else:
            anchors_unsigmoid = self.anchor_boxes.weight[None, :num_select].expand(batch, -1, -1)
        content = self.content_queries.weight[None, :num_select].expand(batch, -1, -1)

        if dn_content is not None:
            content = torch.cat([dn_content, content], 1)
            anchors_unsigmoid = torch.cat([dn_boxes_unsigmoid, anchors_unsigmoid], 1)
            if attn_mask is not None and attn_mask.shape[0] != content.shape[1]:
                raise ValueError(f"attn_mask of size {attn_mask.shape[0]} for {content.shape[1]} queries")

        logits, boxes = self.decode(content, anchors_unsigmoid.sigmoid(), memory, padding_mask, shapes,
                                    starts, ratios, attn_mask)
        return TransformerOutput(logits, boxes, encoder_logits, encoder_boxes)

    def decode(self, tgt: Tensor, anchors: Tensor, memory: Tensor, padding_mask: Tensor, shapes: Tensor,
               starts: Tensor, valid_ratios: Tensor, attn_mask: Tensor | None) -> tuple[list[Tensor], list[Tensor]]:
        """Run the decoder with box refinement; returns the class logits and boxes of every layer.

        As in the official DINO, the reference box of the next layer is refined from the layer's output
        *before* the final decoder norm (and detached), while the predictions use the normed output.
        Look forward twice: layer ``i``'s predicted box is ``sigmoid(delta + logit(reference))`` with the
        *undetached* reference refined by layer ``i - 1``, so its loss also trains layer ``i - 1``.
        """
        logits, boxes = [], []
        reference = previous = anchors
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # (B, 1, L, 4)
        for index, layer in enumerate(self.decoder_layers):
            class_head, box_head = self.layer_heads(index)
            reference_input = reference[:, :, None] * scale
            position_reference = reference if self.mask_padding else reference_input[:, :, 0]
            query_pos = self.query_pos_head(box_sine_embedding(position_reference, self.hidden_dim))
            tgt = layer(tgt, query_pos, reference_input, memory, shapes, starts, padding_mask, attn_mask)
            normed = self.decoder_norm(tgt)
            logits.append(class_head(normed))
            boxes.append((box_head(normed) + inverse_sigmoid(previous)).sigmoid())
            if index + 1 < len(self.decoder_layers):
                previous = (box_head(tgt) + inverse_sigmoid(reference)).sigmoid()
                reference = previous.detach()
        return logits, boxes

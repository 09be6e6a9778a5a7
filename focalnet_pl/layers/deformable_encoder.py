"""Deformable-DETR encoder pieces shared by DINO's transformer and Mask2Former's pixel decoder: the encoder
layer, the reference points of the flattened multi-scale memory and the fraction of each map the image
covers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from focalnet_pl.layers.ms_deform_attn import MultiScaleDeformableAttention, spatial_shapes_list

__all__ = ["DeformableEncoderLayer", "encoder_reference_points", "valid_ratios"]


class DeformableEncoderLayer(nn.Module):
    """Post-norm deformable self-attention over all levels, then a feed-forward block (ReLU)."""

    def __init__(self, dim: int, ffn_dim: int, dropout: float, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor, level_start: Tensor,
                padding_mask: Tensor | None = None) -> Tensor:
        """``src``/``pos`` (B, S, D), ``reference_points`` (B, S, L, 2), ``padding_mask`` (B, S) True at padding."""
        attended = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start, padding_mask)
        src = self.norm1(src + self.dropout(attended))
        return self.norm2(src + self.dropout(self.ffn(src)))

    def upgrade_state_dict(self, state_dict: dict, prefix: str) -> None:
        """Rename, in place, the keys of checkpoints saved before this class was shared: Mask2Former's
        pixel-decoder layers called their attention ``attention``."""
        legacy = f"{prefix}attention."
        for key in [key for key in state_dict if key.startswith(legacy)]:
            state_dict[f"{prefix}self_attn.{key[len(legacy):]}"] = state_dict.pop(key)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.upgrade_state_dict(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def valid_ratios(padding_mask: Tensor) -> Tensor:
    """``(B, 2)`` fraction (x, y) of a level's ``(B, H, W)`` map covered by the image (not padding)."""
    _, height, width = padding_mask.shape
    valid_h = (~padding_mask[:, :, 0]).sum(1).float() / height
    valid_w = (~padding_mask[:, 0, :]).sum(1).float() / width
    return torch.stack([valid_w, valid_h], -1)


def encoder_reference_points(shapes: Tensor, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid area, seen from every level -> ``(B, S, L, 2)``.

    ``shapes`` (L, 2) level sizes, ``valid_ratios`` (B, L, 2) as :func:`valid_ratios` gives them (all ones
    for unpadded maps)."""
    points = []
    for level, (height, width) in enumerate(spatial_shapes_list(shapes)):
        ys, xs = torch.meshgrid(
            torch.arange(height, device=valid_ratios.device, dtype=torch.float32) + 0.5,
            torch.arange(width, device=valid_ratios.device, dtype=torch.float32) + 0.5,
            indexing="ij",
        )
        x = xs.reshape(1, -1) / (valid_ratios[:, None, level, 0] * width)
        y = ys.reshape(1, -1) / (valid_ratios[:, None, level, 1] * height)
        points.append(torch.stack([x, y], -1))
    points = torch.cat(points, 1)
    return points[:, :, None] * valid_ratios[:, None]

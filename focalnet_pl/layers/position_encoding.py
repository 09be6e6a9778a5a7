"""Sine/cosine position embeddings of 2-D feature maps (DETR family), in the two variants our models use.

Both encode each pixel's normalised ``(y, x)`` position with ``num_features`` sine/cosine channels per
axis (``y`` channels first). They differ in what "position" means, and each model keeps its own:

* :class:`MaskFormerSinePositionEmbedding` (Mask2Former's pixel and transformer decoders): the whole
  (padded) map, row ``i`` at ``(i + 1) / H`` of the period, temperature 10000; given a padding mask,
  the valid rows only (``H`` = the image's rows), as DINO's.
* :class:`DINOSinePositionEmbedding` (DINO): only the valid pixels of a padding mask count, row ``i``
  at (valid rows up to ``i``) / (valid rows of that column), temperature 20 by default.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["DINOSinePositionEmbedding", "MaskFormerSinePositionEmbedding", "sine_embedding"]

_EPS = 1e-6


def valid_positions(padding_mask: Tensor, offset: float, scale: float) -> tuple[Tensor, Tensor]:
    """``(y, x)`` positions ``(count + offset) / (valid extent) * scale`` of every pixel, counting valid
    pixels only along each column / row of ``padding_mask (B, H, W)`` (True at padding)."""
    valid = (~padding_mask).float()
    y = valid.cumsum(1)
    x = valid.cumsum(2)
    y = (y + offset) / (y[:, -1].unsqueeze(1) + _EPS) * scale
    x = (x + offset) / (x[:, :, -1].unsqueeze(2) + _EPS) * scale
    return y, x


def sine_embedding(y: Tensor, x: Tensor, num_features: int, temperature: float) -> Tensor:
    """(B, H, W) float positions (already scaled to radians) -> (B, 2 * num_features, H, W) embedding,
    interleaved sine/cosine of ``position / temperature ** (2 * (k // 2) / num_features)``, ``y`` first."""
    dim_t = torch.arange(num_features, dtype=torch.float32, device=y.device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_features)
    pos_x = x[..., None] / dim_t
    pos_y = y[..., None] / dim_t
    pos_x = torch.stack([pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()], dim=4).flatten(3)
    pos_y = torch.stack([pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()], dim=4).flatten(3)
    return torch.cat([pos_y, pos_x], dim=3).permute(0, 3, 1, 2)


class MaskFormerSinePositionEmbedding(nn.Module):
    """Mask2Former's embedding: position ``(i + 1) / (H + 1e-6) * 2 pi`` of row ``i`` (columns alike) over
    the whole map, padding included; returned in float32 whatever the input dtype (as the official code)."""

    def __init__(self, num_features: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature

    def forward(self, features: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, C, H, W) features (only their shape and device are used) -> (B, 2 * num_features, H, W);
        with ``padding_mask (B, H, W)`` (True at padding) positions relative to each image's valid extent."""
        if padding_mask is not None:
            return sine_embedding(*valid_positions(padding_mask, 0.0, 2 * math.pi), self.num_features, self.temperature)
        batch, _, height, width = features.shape
        device = features.device
        scale = 2 * math.pi
        rows = torch.arange(1, height + 1, dtype=torch.float32, device=device)
        cols = torch.arange(1, width + 1, dtype=torch.float32, device=device)
        y = (rows / (height + _EPS) * scale)[None, :, None].expand(batch, height, width)
        x = (cols / (width + _EPS) * scale)[None, None, :].expand(batch, height, width)
        return sine_embedding(y, x, self.num_features, self.temperature)


class DINOSinePositionEmbedding(nn.Module):
    """DINO's embedding: cumulative count of valid pixels along each axis, normalised by the valid extent
    of that row/column, so padded pixels do not stretch the image's positions. The position is
    ``(count + offset) / (valid extent) * scale``: ``offset`` 0 and temperature 20 in the official
    FocalNet-DINO, -0.5 and 10000 in detrex."""

    def __init__(self, num_pos_feats: int, temperature: float = 20.0, scale: float = 2 * math.pi,
                 offset: float = 0.0) -> None:
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.scale = scale
        self.offset = offset

    def forward(self, padding_mask: Tensor) -> Tensor:
        """``padding_mask (B, H, W)`` True at padding -> ``(B, 2 * num_pos_feats, H, W)``."""
        y, x = valid_positions(padding_mask, self.offset, self.scale)
        return sine_embedding(y, x, self.num_pos_feats, self.temperature)

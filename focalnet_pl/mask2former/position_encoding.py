"""Sine positional encoding of 2-D feature maps (as in DETR), shared by the pixel and transformer decoders."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["SinePositionEncoding"]


class SinePositionEncoding(nn.Module):
    """Fixed sine/cosine encoding of normalised (y, x) positions; ``num_features`` channels per axis."""

    def __init__(self, num_features: int, temperature: float = 10000.0) -> None:
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature

    def forward(self, features: Tensor) -> Tensor:
        """(B, C, H, W) features -> (B, 2 * num_features, H, W) encoding (same dtype/device)."""
        batch, _, height, width = features.shape
        device = features.device
        scale = 2 * math.pi
        y = (torch.arange(1, height + 1, device=device, dtype=torch.float32) - 0.5) / height * scale
        x = (torch.arange(1, width + 1, device=device, dtype=torch.float32) - 0.5) / width * scale
        dim_t = torch.arange(self.num_features, device=device, dtype=torch.float32)
        dim_t = self.temperature ** (2 * (dim_t // 2) / self.num_features)
        pos_y = y[:, None] / dim_t  # (H, F)
        pos_x = x[:, None] / dim_t  # (W, F)
        pos_y = torch.stack([pos_y[:, 0::2].sin(), pos_y[:, 1::2].cos()], dim=2).flatten(1)
        pos_x = torch.stack([pos_x[:, 0::2].sin(), pos_x[:, 1::2].cos()], dim=2).flatten(1)
        encoding = torch.cat(
            [pos_y[:, None, :].expand(height, width, -1), pos_x[None, :, :].expand(height, width, -1)], dim=-1
        )
        return encoding.permute(2, 0, 1)[None].expand(batch, -1, -1, -1).to(features.dtype)

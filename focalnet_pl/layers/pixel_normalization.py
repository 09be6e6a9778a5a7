"""Per-channel image normalisation at the entrance of the detectron2 meta-architectures."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["PixelNormalization"]


class PixelNormalization(nn.Module):
    """``(image - mean) / std`` per channel of a ``(C, H, W)`` image (or a batch of them), on the module's device.

    Mean and std are kept in float64 (not saved with the weights) and cast to the requested dtype when
    used, so a float64 model normalises exactly and a float32 one as with float32 constants.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float64).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float64).view(-1, 1, 1), persistent=False)

    def forward(self, image: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        image = image.to(self.mean.device, dtype, non_blocking=True)
        return (image - self.mean.to(dtype)) / self.std.to(dtype)

"""Box helpers shared by the DINO modules (box conversions and GIoU come from torchvision)."""

from __future__ import annotations

from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[0, 1]`` and both terms kept away from zero by ``eps``."""
    x = x.clamp(0.0, 1.0)
    return (x.clamp(min=eps) / (1.0 - x).clamp(min=eps)).log()

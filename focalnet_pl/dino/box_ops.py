"""Box helpers shared by the DINO modules (box conversions and GIoU come from torchvision)."""

from __future__ import annotations

from torch import Tensor


def inverse_sigmoid(x: Tensor, eps: float = 1e-3) -> Tensor:
    """``logit(x)`` with ``x`` clamped to ``[0, 1]`` and both terms kept away from zero by ``eps``
    (``1e-3`` as in the official DINO, so a box at the image border maps to a finite logit of about 6.9)."""
    x = x.clamp(0.0, 1.0)
    return (x.clamp(min=eps) / (1.0 - x).clamp(min=eps)).log()

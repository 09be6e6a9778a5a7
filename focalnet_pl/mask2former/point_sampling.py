"""Point sampling of mask logits (PointRend-style) used by the Mask2Former matcher and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["draw_point_candidates", "point_sample", "sample_uncertain_points", "logit_uncertainty"]


def point_sample(features: Tensor, point_coords: Tensor, align_corners: bool = False) -> Tensor:
    """Bilinearly read ``features`` (N, C, H, W) at ``point_coords`` (N, P, 2) in normalised ``[0, 1]`` (x, y).

    Returns (N, C, P). Points outside the map read zeros.
    """
    if point_coords.dim() != 3 or point_coords.shape[-1] != 2:
        raise ValueError(f"point_coords must be (N, P, 2), got {tuple(point_coords.shape)}")
    grid = (2.0 * point_coords - 1.0).unsqueeze(2).to(features.dtype)  # (N, P, 1, 2)
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=align_corners).squeeze(3)


def logit_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of binary mask logits (N, 1, ...): highest (closest to zero) at the decision boundary."""
    return -logits.abs()


def draw_point_candidates(
    num_masks: int, num_points: int, oversample_ratio: float, importance_sample_ratio: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The random numbers of :func:`sample_uncertain_points`, in its order: ``oversample_ratio * num_points``
    candidates per mask, then the uniformly random rest of the points."""
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
                         f"{oversample_ratio}, {importance_sample_ratio}")
    candidates = torch.rand(num_masks, int(num_points * oversample_ratio), 2, device=device)
    num_random = num_points - int(importance_sample_ratio * num_points)
    return candidates, torch.rand(num_masks, num_random, 2, device=device)


def sample_uncertain_points(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float,
    draws: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Pick ``num_points`` points per mask, mostly where ``mask_logits`` (N, 1, H, W) are least certain.

    ``oversample_ratio * num_points`` random candidates are scored; the ``importance_sample_ratio``
    most uncertain of them are kept and the rest is filled with uniformly random points. ``draws`` are
    the random numbers to use (from :func:`draw_point_candidates`; drawn here when not given).
    Returns (N, num_points, 2) normalised (x, y) coordinates.
    """
    candidates, random_points = draws or draw_point_candidates(
        mask_logits.shape[0], num_points, oversample_ratio, importance_sample_ratio, mask_logits.device
    )
    uncertainty = logit_uncertainty(point_sample(mask_logits, candidates)).squeeze(1)  # (N, candidates)
    chosen = uncertainty.topk(num_points - random_points.shape[1], dim=1).indices
    uncertain_points = torch.gather(candidates, 1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([uncertain_points, random_points], dim=1)

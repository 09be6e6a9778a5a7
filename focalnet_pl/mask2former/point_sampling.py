"""Point sampling of mask logits (PointRend-style) used by the Mask2Former matcher and losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["point_sample", "sample_uncertain_points", "logit_uncertainty"]


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


def sample_uncertain_points(
    mask_logits: Tensor, num_points: int, oversample_ratio: float, importance_sample_ratio: float
) -> Tensor:
    """Pick ``num_points`` points per mask, mostly where ``mask_logits`` (N, 1, H, W) are least certain.

    ``oversample_ratio * num_points`` random candidates are scored; the ``importance_sample_ratio``
    most uncertain of them are kept and the rest is filled with uniformly random points.
    Returns (N, num_points, 2) normalised (x, y) coordinates.
    """
    if oversample_ratio < 1 or not 0 <= importance_sample_ratio <= 1:
        raise ValueError(f"need oversample_ratio >= 1 and importance_sample_ratio in [0, 1], got "
                         f"{oversample_ratio}, {importance_sample_ratio}")
    num_masks = mask_logits.shape[0]
    num_candidates = int(num_points * oversample_ratio)
    candidates = torch.rand(num_masks, num_candidates, 2, device=mask_logits.device)
    uncertainty = logit_uncertainty(point_sample(mask_logits, candidates)).squeeze(1)  # (N, candidates)
    num_uncertain = int(importance_sample_ratio * num_points)
    chosen = uncertainty.topk(num_uncertain, dim=1).indices
    uncertain_points = torch.gather(candidates, 1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    random_points = torch.rand(num_masks, num_points - num_uncertain, 2, device=mask_logits.device)
    return torch.cat([uncertain_points, random_points], dim=1)

"""Hungarian matching of Mask2Former queries to ground-truth masks with point-sampled mask costs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from focalnet_pl.layers.precision import run_in_float32
from focalnet_pl.mask2former.point_sampling import point_sample
from focalnet_pl.matching import assign_sets

__all__ = ["HungarianMaskMatcher", "batch_dice_cost", "batch_sigmoid_bce_cost"]


def batch_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice loss between (Q, P) mask logits and (T, P) binary targets -> (Q, T)."""
    probabilities = logits.sigmoid()
    numerator = 2 * probabilities @ targets.T
    denominator = probabilities.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean binary cross-entropy between (Q, P) logits and (T, P) targets -> (Q, T)."""
    num_points = logits.shape[1]
    # BCE(x, t) = t * softplus(-x) + (1 - t) * softplus(x), summed over points as two matrix products
    positive = nn.functional.softplus(-logits)
    negative = nn.functional.softplus(logits)
    return (positive @ targets.T + negative @ (1 - targets).T) / num_points


class HungarianMaskMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class * -p(class) + w_mask * BCE + w_dice * dice``.

    The mask costs are computed on ``num_points`` random points shared by predictions and targets of
    an image, which keeps memory independent of the mask resolution.
    """

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544) -> None:
        super().__init__()
        if cost_class == cost_mask == cost_dice == 0:
            raise ValueError("all matching costs are zero")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def draw_points(self, targets: list[dict[str, Tensor]], device: torch.device) -> list[Tensor | None]:
        """The random points one matching uses: ``(1, num_points, 2)`` per image with targets, else None."""
        return [torch.rand(1, self.num_points, 2, device=device) if t["labels"].numel() else None for t in targets]

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_masks: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match per image.

        Args:
            pred_logits: (B, Q, K + 1) class logits (last = no object).
            pred_masks: (B, Q, H, W) mask logits.
            targets: per image ``{"labels": (T,) long, "masks": (T, H', W') bool/float}``.

        Returns:
            per image ``(query_indices, target_indices)``, both (min(Q, T),) long, sorted by query.
        """
        return self.match_sets([(pred_logits, pred_masks)], targets)[0]

    @torch.no_grad()
    @run_in_float32
    def match_sets(
        self, predictions: Sequence[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]],
        points: Sequence[list[Tensor | None]] | None = None,
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match several ``(pred_logits, pred_masks)`` sets (the decoder layers) to the same targets, with one
        device-to-host copy for all cost matrices (computed in float32). ``points[set]`` are the sets' :meth:`draw_points` (drawn
        here, set by set, when not given). Returns ``[set][image] -> (query_indices, target_indices)``."""
        costs, slots = [], []
        for set_index, (pred_logits, pred_masks) in enumerate(predictions):
            set_points = points[set_index] if points is not None else self.draw_points(targets, pred_masks.device)
            for image_index, target in enumerate(targets):
                labels, masks = target["labels"], target["masks"]
                if labels.numel() == 0:
                    continue
                class_probabilities = pred_logits[image_index].float().softmax(-1)
                cost_class = -class_probabilities[:, labels]
                image_points = set_points[image_index]
                target_points = point_sample(masks[:, None].float(), image_points.expand(masks.shape[0], -1, -1)).squeeze(1)
                query_masks = pred_masks[image_index][:, None].float()
                query_points = point_sample(query_masks, image_points.expand(query_masks.shape[0], -1, -1)).squeeze(1)
                costs.append(
                    self.cost_class * cost_class
                    + self.cost_mask * batch_sigmoid_bce_cost(query_points, target_points)
                    + self.cost_dice * batch_dice_cost(query_points, target_points)
                )
                slots.append((set_index, image_index))
        return assign_sets(costs, slots, len(predictions), len(targets))

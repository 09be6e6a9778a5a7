"""Mask2Former set-prediction losses: class cross-entropy and point-sampled mask BCE + dice."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focalnet_pl.layers.precision import run_in_float32
from focalnet_pl.mask2former.matcher import HungarianMaskMatcher
from focalnet_pl.mask2former.point_sampling import draw_point_candidates, point_sample, sample_uncertain_points
from focalnet_pl.matching import average_num_targets, indices_to_device

__all__ = ["MaskSetCriterion"]


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of ``1 - dice`` between (N, P) logits and targets, divided by ``num_masks``."""
    probabilities = logits.sigmoid()
    numerator = 2 * (probabilities * targets).sum(-1)
    denominator = probabilities.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Per-mask mean binary cross-entropy over points, summed over masks and divided by ``num_masks``."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


class MaskSetCriterion(nn.Module):
    """Hungarian-matched losses on the final and (deep supervision) every intermediate prediction.

    Returns weighted losses named ``loss_ce``, ``loss_mask``, ``loss_dice`` and, for the auxiliary
    outputs, the same names suffixed ``_<i>``; their sum is the training loss.
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMaskMatcher,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}

    def _class_loss(self, pred_logits: Tensor, images: Tensor, queries: Tensor, labels: Tensor) -> Tensor:
        target_classes = torch.full(pred_logits.shape[:2], self.num_classes, dtype=torch.long, device=pred_logits.device)
        target_classes[images, queries] = labels
        return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, self.class_weights)

    def _mask_losses(self, pred_masks: Tensor, images: Tensor, queries: Tensor, target_masks: Tensor,
                     num_masks: float | Tensor, draws: tuple[Tensor, Tensor] | None) -> dict[str, Tensor]:
        matched_predictions = pred_masks[images, queries]
        if matched_predictions.numel() == 0:
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        matched_predictions = matched_predictions[:, None].float()
        with torch.no_grad():
            points = sample_uncertain_points(
                matched_predictions, self.num_points, self.oversample_ratio, self.importance_sample_ratio, draws
            )
            target_points = point_sample(target_masks[:, None].float(), points).squeeze(1)
        prediction_points = point_sample(matched_predictions, points).squeeze(1)
        return {
            "loss_mask": sigmoid_bce_loss(prediction_points, target_points, num_masks),
            "loss_dice": dice_loss(prediction_points, target_points, num_masks),
        }

    @run_in_float32
    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``outputs``: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, H, W), ``aux_outputs`` list of the same.
        Computed in float32 (autocast off: matching costs, cross-entropy, point-sampled BCE and dice).

        All layers are matched at once (one device-to-host copy of their cost matrices) and their matched
        indices go to the device in one asynchronous copy. The random points are drawn first, in the order
        a layer-by-layer loop draws them (matching points, then the loss's point candidates, per layer).
        """
        device = outputs["pred_logits"].device
        counts = [len(t["labels"]) for t in targets]
        num_masks = average_num_targets(sum(counts), device)
        layers = [outputs, *outputs.get("aux_outputs", [])]
        match_points, loss_draws = [], []
        for layer in layers:
            match_points.append(self.matcher.draw_points(targets, device))
            num_matched = sum(min(layer["pred_logits"].shape[1], count) for count in counts)
            loss_draws.append(draw_point_candidates(
                num_matched, self.num_points, self.oversample_ratio, self.importance_sample_ratio, device
            ) if num_matched else None)
        indices = self.matcher.match_sets([(layer["pred_logits"], layer["pred_masks"]) for layer in layers], targets,
                                          match_points)
        labels = torch.cat([t["labels"] for t in targets])
        masks = torch.cat([t["masks"] for t in targets])
        losses = {}
        for index, (layer, (images, queries, matched), draws) in enumerate(
            zip(layers, indices_to_device(indices, counts, device), loss_draws)
        ):
            layer_losses = {"loss_ce": self._class_loss(layer["pred_logits"], images, queries, labels[matched])}
            layer_losses.update(self._mask_losses(layer["pred_masks"], images, queries, masks[matched], num_masks, draws))
            suffix = "" if index == 0 else f"_{index - 1}"
            losses.update({f"{name}{suffix}": value * self.weights[name] for name, value in layer_losses.items()})
        return losses

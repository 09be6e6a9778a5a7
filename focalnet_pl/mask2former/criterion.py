"""Mask2Former set-prediction losses: class cross-entropy and point-sampled mask BCE + dice."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from focalnet_pl.mask2former.matcher import HungarianMaskMatcher
from focalnet_pl.mask2former.point_sampling import point_sample, sample_uncertain_points

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

    Returns unweighted losses named ``loss_ce``, ``loss_mask``, ``loss_dice`` and, for the auxiliary
    outputs, the same names suffixed ``_<i>``; :attr:`weight_dict` holds their weights.
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
        num_aux_outputs: int = 9,
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
        base = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.weight_dict = dict(base)
        for aux_index in range(num_aux_outputs):
            self.weight_dict.update({f"{name}_{aux_index}": weight for name, weight in base.items()})

    def _class_loss(self, pred_logits: Tensor, targets: list[dict[str, Tensor]], indices) -> Tensor:
        target_classes = torch.full(pred_logits.shape[:2], self.num_classes, dtype=torch.long, device=pred_logits.device)
        for image_index, (query_index, target_index) in enumerate(indices):
            target_classes[image_index, query_index.to(pred_logits.device)] = targets[image_index]["labels"][target_index]
        return F.cross_entropy(pred_logits.float().transpose(1, 2), target_classes, self.class_weights)

    def _mask_losses(self, pred_masks: Tensor, targets: list[dict[str, Tensor]], indices, num_masks: float) -> dict[str, Tensor]:
        matched_predictions = torch.cat([pred_masks[i][q.to(pred_masks.device)] for i, (q, _) in enumerate(indices)])
        matched_targets = torch.cat([targets[i]["masks"][t] for i, (_, t) in enumerate(indices)])
        if matched_predictions.numel() == 0:
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero}
        matched_predictions = matched_predictions[:, None].float()
        with torch.no_grad():
            points = sample_uncertain_points(
                matched_predictions, self.num_points, self.oversample_ratio, self.importance_sample_ratio
            )
            target_points = point_sample(matched_targets[:, None].float(), points).squeeze(1)
        prediction_points = point_sample(matched_predictions, points).squeeze(1)
        return {
            "loss_mask": sigmoid_bce_loss(prediction_points, target_points, num_masks),
            "loss_dice": dice_loss(prediction_points, target_points, num_masks),
        }

    def _losses(self, outputs: dict[str, Tensor], targets: list[dict[str, Tensor]], num_masks: float) -> dict[str, Tensor]:
        indices = self.matcher(outputs["pred_logits"], outputs["pred_masks"], targets)
        losses = {"loss_ce": self._class_loss(outputs["pred_logits"], targets, indices)}
        losses.update(self._mask_losses(outputs["pred_masks"], targets, indices, num_masks))
        return losses

    def forward(self, outputs: dict, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``outputs``: ``pred_logits`` (B, Q, K+1), ``pred_masks`` (B, Q, H, W), ``aux_outputs`` list of the same."""
        num_masks = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=outputs["pred_logits"].device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(num_masks)
            num_masks = num_masks / dist.get_world_size()
        num_masks = max(float(num_masks), 1.0)
        losses = self._losses(outputs, targets, num_masks)
        for aux_index, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            losses.update({f"{k}_{aux_index}": v for k, v in self._losses(aux_outputs, targets, num_masks).items()})
        return losses

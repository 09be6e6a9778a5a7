"""DINO's set-prediction losses: sigmoid focal class loss, L1 and GIoU box losses.

Every decoder layer (final + auxiliary), the selected encoder proposals ("interm") and the
denoising queries ("dn") get the same three losses; matching is Hungarian except for the
denoising queries, whose targets are known by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from focalnet_pl.dino.denoising import DenoisingMeta
from focalnet_pl.dino.matcher import HungarianMatcher
from focalnet_pl.matching import average_num_targets, indices_to_device
from focalnet_pl.layers.precision import run_in_float32

Prediction = dict[str, Tensor]  # "pred_logits" (B, Q, K), "pred_boxes" (B, Q, 4)


class SetCriterion(nn.Module):
    """Weighted DINO losses; returns a dict of already-weighted terms whose sum is the training loss."""

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        class_weight: float = 1.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher
        self.weights = {"loss_class": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def matched_losses(self, prediction: Prediction, matched: MatchedPairs, num_boxes: float | Tensor) -> dict[str, Tensor]:
        """Unweighted class / L1 / GIoU losses of one prediction set for the given query-target pairs."""
        logits, boxes = prediction["pred_logits"], prediction["pred_boxes"]
        one_hot = torch.zeros_like(logits)
        one_hot[matched.images, matched.queries, matched.labels] = 1.0
        loss_class = sigmoid_focal_loss(
            logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
        ) / num_boxes

        matched_boxes = boxes[matched.images, matched.queries]
        matched_targets = matched.boxes.to(matched_boxes.dtype)
        loss_bbox = (matched_boxes - matched_targets).abs().sum() / num_boxes
        giou = torch.diag(generalized_box_iou(
            box_convert(matched_boxes, "cxcywh", "xyxy"), box_convert(matched_targets, "cxcywh", "xyxy")
        ))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_class": loss_class, "loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def _weighted(self, losses: dict[str, Tensor], suffix: str) -> dict[str, Tensor]:
        return {f"{name}{suffix}": value * self.weights[name] for name, value in losses.items()}

    @run_in_float32
    def forward(
        self,
        outputs: Prediction,
        aux_outputs: list[Prediction],
        interm_outputs: Prediction | None,
        dn_outputs: list[Prediction] | None,
        dn_meta: DenoisingMeta | None,
        targets: list[dict[str, Tensor]],
    ) -> dict[str, Tensor]:
        """Losses of the final layer (no suffix), ``aux_outputs[i]`` (``_i``), the encoder proposals
        (``_interm``) and the denoising queries of every layer (``_dn`` last layer, ``_dn_i``), in float32
        (autocast off: matching costs, focal and box losses and their sums).

        All prediction sets are matched at once (one device-to-host copy of their cost matrices) and the
        matched indices of all sets, denoising included, go to the device in one asynchronous copy.
        """
        device = outputs["pred_logits"].device
        num_boxes = average_num_targets(sum(len(t["labels"]) for t in targets), device)
        sets = [("", outputs)] + [(f"_{i}", aux) for i, aux in enumerate(aux_outputs)]
        if interm_outputs is not None:
            sets.append(("_interm", interm_outputs))
        indices = self.matcher.match_sets([(p["pred_logits"], p["pred_boxes"]) for _, p in sets], targets)
        denoising = dn_outputs is not None and dn_meta is not None
        if denoising:
            indices.append([dn_meta.positive_indices(image) for image in range(len(targets))])
        matched = MatchedPairs.gather(indices, targets, device)

        losses: dict[str, Tensor] = {}
        for (suffix, prediction), pairs in zip(sets, matched):
            losses.update(self._weighted(self.matched_losses(prediction, pairs, num_boxes), suffix))
        if dn_outputs is not None:
            dn_suffixes = [f"_dn_{i}" for i in range(len(dn_outputs) - 1)] + ["_dn"]
            if not denoising:
                # nothing to denoise in this batch: zero terms keep the logged keys and the graph stable
                for suffix, prediction in zip(dn_suffixes, dn_outputs):
                    zero = prediction["pred_boxes"].sum() * 0.0
                    losses.update({f"{name}{suffix}": zero for name in self.weights})
            else:
                dn_num_boxes = num_boxes * dn_meta.groups
                for suffix, prediction in zip(dn_suffixes, dn_outputs):
                    losses.update(self._weighted(self.matched_losses(prediction, matched[-1], dn_num_boxes), suffix))
        return losses


@dataclass
class MatchedPairs:
    """The matched (image, query) -> target pairs of one prediction set, as device index tensors, with the
    targets' labels and boxes gathered in the same order."""

    images: Tensor
    queries: Tensor
    labels: Tensor
    boxes: Tensor

    @staticmethod
    def gather(indices: list[list[tuple[Tensor, Tensor]]], targets: list[dict[str, Tensor]],
               device: torch.device) -> list[MatchedPairs]:
        """``indices[set][image] = (query_indices, target_indices)`` (host tensors) -> one
        :class:`MatchedPairs` per set; one host-to-device copy for all sets."""
        labels = torch.cat([t["labels"] for t in targets]).to(device, non_blocking=True)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device, non_blocking=True)
        return [
            MatchedPairs(images, queries, labels[flat_targets], boxes[flat_targets])
            for images, queries, flat_targets in indices_to_device(indices, [len(t["labels"]) for t in targets], device)
        ]

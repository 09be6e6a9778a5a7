"""Hungarian matching between predicted queries and ground-truth boxes (one-to-one, scipy)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou

from focalnet_pl.layers.precision import run_in_float32
from focalnet_pl.matching import assign_sets


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Cost ``(..., Q, G)`` of assigning each query to each target label under the sigmoid focal loss.

    It is the focal loss of calling the label positive minus the focal loss of calling it negative.
    ``logits`` is ``(..., Q, K)``.
    """
    prob = logits[..., labels].sigmoid()
    eps = 1e-8
    positive = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    return positive - negative


class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one assignment with focal class, L1 box and GIoU costs.

    Boxes are normalised ``(cx, cy, w, h)``. Returns, per image, ``(query_indices, target_indices)``
    (int64 tensors on the CPU, sorted by query index). :meth:`match_sets` matches several prediction
    sets (every decoder layer, the encoder proposals) with a single device-to-host copy.
    """

    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, labels: Tensor, target_boxes: Tensor) -> Tensor:
        """Total cost ``(..., Q, G)`` for one image: ``logits (..., Q, K)``, ``boxes (..., Q, 4)``,
        ``labels (G,)``, ``target_boxes (G, 4)``; leading dimensions (e.g. prediction sets) are batched."""
        class_cost = focal_class_cost(logits.float(), labels, self.focal_alpha, self.focal_gamma)
        boxes = boxes.float()
        target_boxes = target_boxes.float()
        l1_cost = torch.cdist(boxes, target_boxes.expand(*boxes.shape[:-2], *target_boxes.shape), p=1)
        giou_cost = -generalized_box_iou(
            box_convert(boxes.reshape(-1, 4), "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy")
        ).view(l1_cost.shape)
        return self.cost_class * class_cost + self.cost_bbox * l1_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match ``pred_logits (B, Q, K)`` / ``pred_boxes (B, Q, 4)`` to ``targets[b]["labels"|"boxes"]``."""
        return self.match_sets([(pred_logits, pred_boxes)], targets)[0]

    @torch.no_grad()
    @run_in_float32
    def match_sets(
        self, predictions: Sequence[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]]
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match each ``(pred_logits (B, Q, K), pred_boxes (B, Q, 4))`` of ``predictions`` to the same targets.

        The cost matrices of all sets are computed in float32 on the predictions' device (sets of one shape stacked,
        one batched computation per image) and copied to the host together: one device sync for all.
        Returns ``[set][image] -> (query_indices, target_indices)``.
        """
        groups: dict[tuple, list[int]] = {}
        for index, (logits, boxes) in enumerate(predictions):
            groups.setdefault((logits.shape, boxes.shape, logits.dtype, boxes.dtype), []).append(index)
        costs, slots = [], []
        for members in groups.values():
            logits = torch.stack([predictions[index][0] for index in members])
            boxes = torch.stack([predictions[index][1] for index in members])
            for image, target in enumerate(targets):
                if target["labels"].numel() == 0:
                    continue
                cost = self.cost_matrix(logits[:, image], boxes[:, image], target["labels"], target["boxes"])
                for set_index, set_cost in zip(members, cost):
                    costs.append(set_cost)
                    slots.append((set_index, image))
        return assign_sets(costs, slots, len(predictions), len(targets))

"""Hungarian matching between predicted queries and ground-truth boxes (one-to-one, scipy)."""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Cost ``(Q, G)`` of assigning each query to each target label under the sigmoid focal loss.

    It is the focal loss of calling the label positive minus the focal loss of calling it negative.
    """
    prob = logits.sigmoid()
    eps = 1e-8
    positive = alpha * (1 - prob) ** gamma * -(prob + eps).log()
    negative = (1 - alpha) * prob**gamma * -(1 - prob + eps).log()
    return positive[:, labels] - negative[:, labels]


class HungarianMatcher(nn.Module):
    """Minimum-cost one-to-one assignment with focal class, L1 box and GIoU costs.

    Boxes are normalised ``(cx, cy, w, h)``. Returns, per image, ``(query_indices, target_indices)``
    (int64 tensors on the CPU, sorted by query index).
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
        """Total cost ``(Q, G)`` for one image: ``logits (Q, K)``, ``boxes (Q, 4)``, ``labels (G,)``, ``target_boxes (G, 4)``."""
        class_cost = focal_class_cost(logits.float(), labels, self.focal_alpha, self.focal_gamma)
        l1_cost = torch.cdist(boxes.float(), target_boxes.float(), p=1)
        giou_cost = -generalized_box_iou(
            box_convert(boxes.float(), "cxcywh", "xyxy"), box_convert(target_boxes.float(), "cxcywh", "xyxy")
        )
        return self.cost_class * class_cost + self.cost_bbox * l1_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(self, pred_logits: Tensor, pred_boxes: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Match ``pred_logits (B, Q, K)`` / ``pred_boxes (B, Q, 4)`` to ``targets[b]["labels"|"boxes"]``."""
        indices = []
        for image, target in enumerate(targets):
            labels, target_boxes = target["labels"], target["boxes"]
            if labels.numel() == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty))
                continue
            cost = self.cost_matrix(pred_logits[image], pred_boxes[image], labels, target_boxes).cpu()
            if not torch.isfinite(cost).all():
                raise FloatingPointError(
                    f"HungarianMatcher: non-finite matching cost for image {image} of the batch "
                    "(predictions contain NaN/inf: training diverged)"
                )
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices

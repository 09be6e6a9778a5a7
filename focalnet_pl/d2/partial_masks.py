"""Mask R-CNN on data where some instances have a box but no mask.

Users' own COCO-format data often mixes both: boxes for every object, masks for some. The data side
(:class:`datamodules.coco.COCOInstanceMapper`) then gives every instance a mask (an empty one when it
has none) and a ``gt_has_mask`` flag. The RPN and the box head learn from every box. detectron2 copies
each ground-truth field onto the proposals matched to it, so the mask head's foreground proposals carry
the flag of their object; :func:`train_masks_where_annotated` makes the mask head compute its loss
on the proposals whose object has a mask only (what the head would see if the others had no mask
to learn, rather than an empty one).
"""
from __future__ import annotations

from typing import Any

import torch
from detectron2.structures import Instances
from torch import nn

__all__ = ["HAS_MASK_FIELD", "train_masks_where_annotated"]

#: per-instance bool field: the instance's mask is annotated (absent: every instance has a mask)
HAS_MASK_FIELD = "gt_has_mask"


def _annotated_only(head: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook of a mask head ``head(pooled_features, instances)``: drops the foreground
    proposals of box-only objects (rows of the pooled features and entries of the instances)."""
    if not head.training or len(args) != 2 or not any(i.has(HAS_MASK_FIELD) for i in args[1]):
        return None
    features, instances = args
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{type(head).__name__} gets {type(features).__name__} features, not pooled boxes: it "
                        "cannot leave out the objects without a mask annotation")
    keeps = [i.get(HAS_MASK_FIELD) if i.has(HAS_MASK_FIELD) else torch.ones(len(i), dtype=torch.bool, device=features.device)
             for i in instances]
    kept: list[Instances] = [i[keep] for i, keep in zip(instances, keeps)]
    return features[torch.cat(keeps)], kept


def train_masks_where_annotated(model: nn.Module) -> None:
    """Let ``model``'s mask head (``model.roi_heads.mask_head``, if any) learn from annotated masks only."""
    mask_head = getattr(getattr(model, "roi_heads", None), "mask_head", None)
    if isinstance(mask_head, nn.Module):
        mask_head.register_forward_pre_hook(_annotated_only)

"""The official FocalNet Mask R-CNN checkpoints (mmdetection v2 layout) in our detectron2 Mask R-CNN.

microsoft/FocalNet released its Mask R-CNN models (T/S/B x srf/lrf x 1x/3x) from an mmdetection v2
fork: ``{"meta": ..., "state_dict": {backbone.*, neck.*, rpn_head.*, roi_head.*}}``. This layout maps
every tensor onto ``GeneralizedRCNN`` (or its subclass ``PaddingMaskedRCNN`` of ``configs/mask_rcnn_focalnet_*.yaml``):

==========================================  ==================================================
mmdetection                                 detectron2
==========================================  ==================================================
``backbone.*``                              ``backbone.bottom_up.body.*`` (same FocalNet names)
``neck.lateral_convs.{i}.conv``             ``backbone.fpn_lateral{2+i}``
``neck.fpn_convs.{i}.conv``                 ``backbone.fpn_output{2+i}``
``rpn_head.rpn_conv / rpn_cls / rpn_reg``   ``proposal_generator.rpn_head.conv / objectness_logits
                                            / anchor_deltas``
``roi_head.bbox_head.shared_fcs.{0,1}``     ``roi_heads.box_head.fc1 / fc2``
``roi_head.bbox_head.fc_cls / fc_reg``      ``roi_heads.box_predictor.cls_score / bbox_pred``
``roi_head.mask_head.convs.{i}.conv``       ``roi_heads.mask_head.mask_fcn{i+1}``
``roi_head.mask_head.upsample``             ``roi_heads.mask_head.deconv``
``roi_head.mask_head.conv_logits``          ``roi_heads.mask_head.predictor``
==========================================  ==================================================

What differs between the frameworks beyond names:

* box deltas: mmdetection's ``DeltaXYWHBBoxCoder`` de-normalises ``d * std + mean``, detectron2's
  ``Box2BoxTransform`` divides by ``BBOX_REG_WEIGHTS``; the regressor rows are rescaled so that both
  decode the same boxes (a no-op for the released heads: stds (0.1, 0.1, 0.2, 0.2) = 1 / (10, 10, 5, 5),
  RPN stds 1 = 1 / (1, 1, 1, 1));
* classes: both put the background score last; mmdetection's 80 classes are COCO's thing categories
  in dataset-id order, so class rows are selected by dataset id (:class:`ClassRows`);
* anchors: both enumerate (location, ratio) with ratios (0.5, 1, 2) as height / width, centred on
  ``stride * (x, y)``; the model's anchor generator is checked against the released one
  (``scales=[8]``, strides 4..64, offset 0) before the RPN weights are accepted.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from torch import Tensor, nn

from focalnet_pl.detector_weights import ClassRows, ConvertedState, register_detector_layout
from focalnet_pl.focalnet import FocalNet
from focalnet_pl.weights import CheckpointError, StateDict

__all__ = ["COCO_THING_IDS", "COCO_THING_NAMES", "MMDetMaskRCNNLayout", "mmdet_base_anchors"]

#: COCO's 80 thing categories in dataset-id order: mmdetection's contiguous classes 0..79.
COCO_THING_IDS: tuple[int, ...] = tuple(c["id"] for c in COCO_CATEGORIES if c["isthing"])
COCO_THING_NAMES: tuple[str, ...] = tuple(c["name"] for c in COCO_CATEGORIES if c["isthing"])


def mmdet_base_anchors(stride: int, scales: Sequence[float], ratios: Sequence[float]) -> Tensor:
    """The anchors of one location in mmdetection v2's ``AnchorGenerator`` (centre offset 0,
    scale-major: ratio ``r`` outer, scale inner), as ``(x0, y0, x1, y1)`` around the origin."""
    ratios_t = torch.as_tensor(ratios, dtype=torch.float64)
    scales_t = torch.as_tensor(scales, dtype=torch.float64)
    heights = (stride * ratios_t.sqrt()[:, None] * scales_t[None, :]).reshape(-1)
    widths = (stride / ratios_t.sqrt()[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-widths / 2, -heights / 2, widths / 2, heights / 2], dim=1)


def _tensors(checkpoint: Mapping[str, Any]) -> StateDict:
    inner = checkpoint.get("state_dict", checkpoint)
    return {k: v for k, v in inner.items() if isinstance(v, Tensor)} if isinstance(inner, Mapping) else {}


def _find_prefix(model: nn.Module, kind: type) -> str:
    for name, module in model.named_modules():
        if isinstance(module, kind):
            return f"{name}." if name else ""
    raise CheckpointError(f"the model has no {kind.__name__}: an mmdetection Mask R-CNN checkpoint needs one")


def _delta_rows(weight: Tensor, bias: Tensor, stds: Sequence[float], means: Sequence[float],
                reg_weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """A regressor's (weight, bias) whose outputs decode, with detectron2's ``reg_weights``, as the
    mmdetection outputs do with ``stds`` / ``means``: ``d2 = (mm * std + mean) * reg_weight``."""
    repeats = weight.shape[0] // 4
    std = torch.as_tensor(stds, dtype=weight.dtype).repeat(repeats)
    mean = torch.as_tensor(means, dtype=weight.dtype).repeat(repeats)
    scale = torch.as_tensor(reg_weights, dtype=weight.dtype).repeat(repeats)
    shape = (-1,) + (1,) * (weight.dim() - 1)
    return weight * (std * scale).view(shape), (bias * std + mean) * scale


class MMDetMaskRCNNLayout:
    """mmdetection v2 Mask R-CNN (``Shared2FCBBoxHead`` + ``FCNMaskHead``), as released by
    microsoft/FocalNet; the arguments are the released config's (``mask_rcnn_focalnet_fpn.py``)."""

    name = "mmdet-mask-rcnn"

    def __init__(
        self,
        anchor_scales: Sequence[float] = (8,),
        anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_strides: Sequence[int] = (4, 8, 16, 32, 64),
        rpn_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        rcnn_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
    ) -> None:
        self.anchor_scales, self.anchor_ratios = tuple(anchor_scales), tuple(anchor_ratios)
        self.anchor_strides = tuple(anchor_strides)
        self.rpn_stds, self.rcnn_stds, self.means = tuple(rpn_stds), tuple(rcnn_stds), tuple(means)

    def matches(self, checkpoint: Mapping[str, Any]) -> bool:
        keys = _tensors(checkpoint)
        return any(k.startswith("rpn_head.rpn_") for k in keys) and any(k.startswith("roi_head.bbox_head.") for k in keys)

    @staticmethod
    def class_ids(checkpoint: Mapping[str, Any]) -> tuple[int, ...] | None:
        """COCO dataset ids of the checkpoint's classes: mmdetection's ``meta.CLASSES`` when recorded
        (COCO names, in order), else COCO's 80 when the classifier has 80 classes + background."""
        meta = checkpoint.get("meta")
        names = meta.get("CLASSES") if isinstance(meta, Mapping) else None
        by_name = dict(zip(COCO_THING_NAMES, COCO_THING_IDS))
        if names:
            return tuple(by_name[n] for n in names) if all(n in by_name for n in names) else None
        cls = _tensors(checkpoint).get("roi_head.bbox_head.fc_cls.weight")
        return COCO_THING_IDS if cls is not None and cls.shape[0] == len(COCO_THING_IDS) + 1 else None

    def _check_anchors(self, model: nn.Module) -> None:
        generator = getattr(getattr(model, "proposal_generator", None), "anchor_generator", None)
        if generator is None:
            return
        ours = [tuple(cell.shape) for cell in generator.cell_anchors]
        strides = tuple(int(s) for s in generator.strides)
        theirs = [mmdet_base_anchors(s, self.anchor_scales, self.anchor_ratios) for s in self.anchor_strides]
        same = strides == self.anchor_strides and float(generator.offset) == 0.0 and all(
            cell.shape == ref.shape and torch.allclose(cell.double(), ref, atol=1e-3)
            for cell, ref in zip(generator.cell_anchors, theirs)
        )
        if not same:
            sizes = [round(float((c[:, 2] - c[:, 0]).mul(c[:, 3] - c[:, 1]).sqrt().mean())) for c in generator.cell_anchors]
            raise CheckpointError(
                "the RPN of this mmdetection checkpoint was trained with anchors of scales "
                f"{list(self.anchor_scales)} x stride {list(self.anchor_strides)}, ratios {list(self.anchor_ratios)}, "
                f"offset 0; the model has sizes ~{sizes} at strides {list(strides)} ({ours} cells), offset "
                f"{generator.offset}: set MODEL.ANCHOR_GENERATOR.SIZES [[32], [64], [128], [256], [512]], "
                "ASPECT_RATIOS [[0.5, 1.0, 2.0]], OFFSET 0.0 (configs/mask_rcnn_focalnet_*.yaml)"
            )

    def _fpn_levels(self, model: nn.Module) -> list[int]:
        fpn = getattr(model, "backbone", None)
        if fpn is None or not hasattr(fpn, "bottom_up") or not hasattr(fpn, "in_features"):
            return []
        shapes = fpn.bottom_up.output_shape()
        return [int(math.log2(shapes[name].stride)) for name in fpn.in_features]

    def convert(self, checkpoint: Mapping[str, Any], model: nn.Module) -> ConvertedState:
        source = _tensors(checkpoint)
        backbone = _find_prefix(model, FocalNet)
        levels = self._fpn_levels(model)
        self._check_anchors(model)
        state = ConvertedState(tensors={})
        ids = self.class_ids(checkpoint)

        def put(ours: str, value: Tensor, converted: bool = False, rows: ClassRows | None = None) -> None:
            state.tensors[ours] = value
            if converted:
                state.converted.add(ours)
            if rows is not None:
                state.class_rows[ours] = rows

        rules: list[tuple[str, Any]] = [
            (r"^backbone\.(.+)$", lambda m: backbone + m[1]),
            (r"^neck\.lateral_convs\.(\d+)\.conv\.(weight|bias)$",
             lambda m: f"backbone.fpn_lateral{levels[int(m[1])]}.{m[2]}" if int(m[1]) < len(levels) else None),
            (r"^neck\.fpn_convs\.(\d+)\.conv\.(weight|bias)$",
             lambda m: f"backbone.fpn_output{levels[int(m[1])]}.{m[2]}" if int(m[1]) < len(levels) else None),
            (r"^rpn_head\.rpn_conv\.(weight|bias)$", lambda m: f"proposal_generator.rpn_head.conv.{m[1]}"),
            (r"^rpn_head\.rpn_cls\.(weight|bias)$", lambda m: f"proposal_generator.rpn_head.objectness_logits.{m[1]}"),
            (r"^roi_head\.bbox_head\.shared_fcs\.([01])\.(weight|bias)$",
             lambda m: f"roi_heads.box_head.fc{int(m[1]) + 1}.{m[2]}"),
            (r"^roi_head\.mask_head\.convs\.(\d+)\.conv\.(weight|bias)$",
             lambda m: f"roi_heads.mask_head.mask_fcn{int(m[1]) + 1}.{m[2]}"),
            (r"^roi_head\.mask_head\.upsample\.(weight|bias)$", lambda m: f"roi_heads.mask_head.deconv.{m[1]}"),
        ]
        special = {"rpn_head.rpn_reg.weight", "rpn_head.rpn_reg.bias", "roi_head.bbox_head.fc_reg.weight",
                   "roi_head.bbox_head.fc_reg.bias", "roi_head.bbox_head.fc_cls.weight", "roi_head.bbox_head.fc_cls.bias",
                   "roi_head.mask_head.conv_logits.weight", "roi_head.mask_head.conv_logits.bias"}
        for key, value in source.items():
            if key in special:
                continue
            for pattern, target in rules:
                match = re.match(pattern, key)
                if match:
                    ours = target(match)
                    if ours is None:
                        state.unexpected.append(key)
                    else:
                        put(ours, value, converted=not key.startswith("backbone."))
                    break
            else:
                state.unexpected.append(key)

        rpn = getattr(model, "proposal_generator", None)
        if "rpn_head.rpn_reg.weight" in source and "rpn_head.rpn_reg.bias" in source:
            reg_weights = rpn.box2box_transform.weights if rpn is not None else (1.0,) * 4
            weight, bias = _delta_rows(source["rpn_head.rpn_reg.weight"], source["rpn_head.rpn_reg.bias"],
                                       self.rpn_stds, self.means, reg_weights)
            put("proposal_generator.rpn_head.anchor_deltas.weight", weight, converted=True)
            put("proposal_generator.rpn_head.anchor_deltas.bias", bias, converted=True)
        roi_heads = getattr(model, "roi_heads", None)
        predictor = getattr(roi_heads, "box_predictor", None)
        if "roi_head.bbox_head.fc_reg.weight" in source and "roi_head.bbox_head.fc_reg.bias" in source:
            reg_weights = predictor.box2box_transform.weights if predictor is not None else (10.0, 10.0, 5.0, 5.0)
            weight, bias = _delta_rows(source["roi_head.bbox_head.fc_reg.weight"], source["roi_head.bbox_head.fc_reg.bias"],
                                       self.rcnn_stds, self.means, reg_weights)
            rows = ClassRows(source_ids=ids, rows_per_class=4)
            put("roi_heads.box_predictor.bbox_pred.weight", weight, converted=True, rows=rows)
            put("roi_heads.box_predictor.bbox_pred.bias", bias, converted=True, rows=rows)
        for suffix in ("weight", "bias"):
            cls = source.get(f"roi_head.bbox_head.fc_cls.{suffix}")
            if cls is not None:
                put(f"roi_heads.box_predictor.cls_score.{suffix}", cls, converted=True,
                    rows=ClassRows(source_ids=ids, extra_rows=1))
            logits = source.get(f"roi_head.mask_head.conv_logits.{suffix}")
            if logits is not None:
                put(f"roi_heads.mask_head.predictor.{suffix}", logits, converted=True, rows=ClassRows(source_ids=ids))
        return state

    def describe(self, checkpoint: Mapping[str, Any]) -> dict[str, Any]:
        """What ``focalnet-pl inspect`` prints for such a file."""
        source = _tensors(checkpoint)
        ids = self.class_ids(checkpoint)
        cls = source.get("roi_head.bbox_head.fc_cls.weight")
        info: dict[str, Any] = {
            "detector": "Mask R-CNN" if any(k.startswith("roi_head.mask_head.") for k in source) else "Faster R-CNN",
            "fpn_levels": len({k.split(".")[2] for k in source if k.startswith("neck.lateral_convs.")}),
            "num_classes": int(cls.shape[0]) - 1 if cls is not None else None,
        }
        if ids is not None:
            names = dict(zip(COCO_THING_IDS, COCO_THING_NAMES))
            info["classes"] = [names[i] for i in ids]
        meta = checkpoint.get("meta")
        if isinstance(meta, Mapping):
            info.update({k: meta[k] for k in ("mmdet_version", "epoch", "iter") if k in meta})
        return info


register_detector_layout(MMDetMaskRCNNLayout())

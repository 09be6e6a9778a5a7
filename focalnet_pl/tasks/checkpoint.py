"""What a :class:`~focalnet_pl.tasks.detection.DetectionTask` checkpoint records besides its weights, the
checks of a checkpoint restored into a configured task, and the detector weights a task starts from.

``checkpoint["detection"]`` holds the meta-architecture, the number of classes and their metadata
(:data:`CLASS_FIELDS`, so that predict names and maps classes without the data);
``checkpoint["focalnet_pl_architecture"]`` the architecture record (:mod:`focalnet_pl.architecture`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.data import Metadata
from torch import nn

from focalnet_pl.architecture import focalnet_settings
from focalnet_pl.d2.backbone import FocalNetBackbone
from focalnet_pl.detector_weights import DetectorLoadReport, load_detector_weights

__all__ = ["CLASS_FIELDS", "CLASSES_KEY", "check_state_dict", "class_record", "detection_architecture",
           "load_initial_weights", "saved_classes"]

#: the entry of the class record in a Lightning checkpoint
CLASSES_KEY = "detection"

#: the class metadata fields a checkpoint keeps, so that predict names and maps classes without the data
CLASS_FIELDS = ("thing_classes", "thing_dataset_id_to_contiguous_id", "stuff_classes",
                "stuff_dataset_id_to_contiguous_id", "thing_class_ids", "thing_colors", "stuff_colors")


def detection_architecture(cfg: CfgNode, model: nn.Module, num_classes: int | None, class_metadata: Metadata | None,
                           eval_size: tuple[int, int] | None) -> dict[str, Any]:
    """The architecture record of a detectron2 ``model`` built from ``cfg`` (see :mod:`focalnet_pl.architecture`)."""
    backbone = next((m for m in model.modules() if isinstance(m, FocalNetBackbone)), None)
    levels = {f"MODEL.{name}.NUM_FEATURE_LEVELS": node.NUM_FEATURE_LEVELS
              for name, node in cfg.MODEL.items() if isinstance(node, CfgNode) and "NUM_FEATURE_LEVELS" in node}
    return {
        "task": "detection",
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "focalnet": focalnet_settings(backbone.body.cfg, cfg.MODEL.FOCALNET.VARIANT) if backbone is not None else None,
        "out_features": list(backbone.output_shape()) if backbone is not None else None,
        "feature_levels": levels,
        "mask_on": bool(cfg.MODEL.MASK_ON),
        "num_classes": num_classes,
        "class_names": list(class_metadata.thing_classes) if class_metadata is not None else None,
        "input_format": cfg.INPUT.FORMAT,
        "eval_size": list(eval_size) if eval_size is not None else None,
    }


def class_record(meta_architecture: str, num_classes: int | None, class_metadata: Metadata | None) -> dict[str, Any]:
    """``checkpoint["detection"]``: the meta-architecture, number of classes and the :data:`CLASS_FIELDS`
    of ``class_metadata`` that are set."""
    record: dict[str, Any] = {"meta_architecture": meta_architecture, "num_classes": num_classes}
    if class_metadata is not None:
        record.update({name: class_metadata.get(name) for name in CLASS_FIELDS
                       if class_metadata.get(name, None) is not None})
    return record


def saved_classes(checkpoint: Mapping[str, Any], meta_architecture: str) -> tuple[Metadata | None, int]:
    """The class metadata (``None`` when the checkpoint has no class names) and number of classes of a
    checkpoint, which must hold a ``meta_architecture`` model."""
    record = checkpoint.get(CLASSES_KEY)
    if not isinstance(record, dict):
        raise ValueError(f"not a DetectionTask checkpoint (no {CLASSES_KEY!r} entry)")
    if record["meta_architecture"] != meta_architecture:
        raise ValueError(
            f"checkpoint holds a {record['meta_architecture']} model but the config builds {meta_architecture}"
        )
    metadata = Metadata(**{name: record[name] for name in CLASS_FIELDS if name in record}) \
        if "thing_classes" in record else None
    return metadata, record["num_classes"]


def check_state_dict(own: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor]) -> None:
    """Raise ``ValueError`` naming the missing, unexpected and reshaped keys of a checkpoint's state dict
    ``theirs`` against the configured model's ``own``."""
    missing = sorted(set(own) - set(theirs))
    unexpected = sorted(set(theirs) - set(own))
    reshaped = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
    if missing or unexpected or reshaped:
        raise ValueError(
            "checkpoint does not match the configured model (another head or backbone?): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(reshaped)} with other shapes {[(k, tuple(theirs[k].shape), tuple(own[k].shape)) for k in reshaped[:5]]}"
        )


def load_initial_weights(model: nn.Module, source: str, class_metadata: Metadata | None,
                         keep_backbone: bool = False) -> DetectorLoadReport:
    """Load a full detector checkpoint ``source`` (official, detrex, mmdetection or ours) into ``model``, class
    rows chosen by the dataset ids of ``class_metadata``'s classes (see :func:`focalnet_pl.load_detector_weights`).
    ``keep_backbone`` (the FocalNet backbone comes from ``MODEL.FOCALNET.WEIGHTS``): the checkpoint's tensors
    under it (FocalNet or, in official releases, Swin / ResNet) are skipped."""
    class_ids = class_names = None
    if class_metadata is not None:
        id_map = class_metadata.get("stuff_dataset_id_to_contiguous_id", None) \
            or class_metadata.thing_dataset_id_to_contiguous_id
        to_dataset = {v: k for k, v in id_map.items()}
        class_ids = [to_dataset[i] for i in range(len(to_dataset))]
        class_names = list(class_metadata.thing_classes)
    backbone_filter = None
    if keep_backbone:
        prefixes = tuple(f"{name}." for name, m in model.named_modules() if isinstance(m, FocalNetBackbone))
        backbone_filter = lambda key: not key.startswith(prefixes)  # noqa: E731
    return load_detector_weights(model, source, class_ids=class_ids, class_names=class_names,
                                 checkpoint_filter=backbone_filter)

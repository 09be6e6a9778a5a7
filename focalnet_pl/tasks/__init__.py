"""LightningModules: thin glue between a model, its losses and its metrics.

Detection and segmentation tasks import detectron2; they load on first access.
"""
from importlib import import_module
from typing import Any

from focalnet_pl.tasks.classification import ClassificationTask

_LAZY = {
    "DetectionTask": "focalnet_pl.tasks.detection",
    "SegmentationTask": "focalnet_pl.tasks.segmentation",
}

__all__ = ["ClassificationTask", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

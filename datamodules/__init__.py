"""LightningDataModules and data utilities of focalnet-pl."""
from importlib import import_module
from typing import Any

from datamodules.demo_shapes import ensure_demo_shapes, generate_demo_shapes
from datamodules.image_io import (
    EmptyDatasetError,
    ImageFilesDataset,
    ImageReadError,
    SafeImageFolder,
    read_image_rgb,
    read_image_tensor,
)
from datamodules.imagenet import DemoShapesDataModule, ImageNetDataModule

# detectron2-backed datamodules load on first access (importing detectron2 takes a few seconds)
_LAZY = {
    "COCODataModule": "datamodules.coco",
    "COCOPanopticDataModule": "datamodules.coco_panoptic",
    "ADE20KSemanticDataModule": "datamodules.ade20k",
    "ADE20KPanopticDataModule": "datamodules.ade20k",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "DemoShapesDataModule",
    "EmptyDatasetError",
    "ImageFilesDataset",
    "ImageNetDataModule",
    "ImageReadError",
    "SafeImageFolder",
    "ensure_demo_shapes",
    "generate_demo_shapes",
    "read_image_rgb",
    "read_image_tensor",
]

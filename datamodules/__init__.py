"""LightningDataModules and data utilities of focalnet-pl."""

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

__all__ = [
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

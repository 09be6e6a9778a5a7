"""detectron2 integration: the FocalNet backbones and ``PaddingMaskedRCNN`` (registered on import) and config helpers."""

from focalnet_pl.d2.backbone import FocalNetBackbone, build_focalnet_backbone, build_focalnet_fpn_backbone
from focalnet_pl.d2.rcnn import PaddingMaskedRCNN
from focalnet_pl.d2.config import (
    CONFIG_EXTENSIONS,
    NUM_CLASSES_KEYS,
    add_focalnet_config,
    build_detectron2_cfg,
)

__all__ = [
    "CONFIG_EXTENSIONS",
    "PaddingMaskedRCNN",
    "NUM_CLASSES_KEYS",
    "FocalNetBackbone",
    "add_focalnet_config",
    "build_detectron2_cfg",
    "build_focalnet_backbone",
    "build_focalnet_fpn_backbone",
]

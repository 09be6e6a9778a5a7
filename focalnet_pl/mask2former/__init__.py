"""Mask2Former for semantic, instance and panoptic segmentation on detectron2.

Importing this package registers ``Mask2Former`` in detectron2's ``META_ARCH_REGISTRY`` and its
config keys in :data:`focalnet_pl.d2.config.CONFIG_EXTENSIONS`.
"""

from focalnet_pl.d2.config import CONFIG_EXTENSIONS, NUM_CLASSES_KEYS
from focalnet_pl.mask2former.config import add_mask2former_config
from focalnet_pl.mask2former.criterion import MaskSetCriterion
from focalnet_pl.mask2former.mask2former import Mask2Former, instance_inference, panoptic_inference, semantic_inference
from focalnet_pl.mask2former.matcher import HungarianMaskMatcher
from focalnet_pl.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from focalnet_pl.mask2former.point_sampling import point_sample, sample_uncertain_points
from focalnet_pl.mask2former.transformer_decoder import MaskedAttentionDecoder

if add_mask2former_config not in CONFIG_EXTENSIONS:
    CONFIG_EXTENSIONS.append(add_mask2former_config)
NUM_CLASSES_KEYS.setdefault("Mask2Former", "MODEL.SEM_SEG_HEAD.NUM_CLASSES")

__all__ = [
    "HungarianMaskMatcher",
    "MSDeformAttnPixelDecoder",
    "Mask2Former",
    "MaskSetCriterion",
    "MaskedAttentionDecoder",
    "add_mask2former_config",
    "instance_inference",
    "panoptic_inference",
    "point_sample",
    "sample_uncertain_points",
    "semantic_inference",
]

"""focalnet-pl: Focal Modulation Networks on PyTorch Lightning and detectron2.

Importing the package registers everything it provides with detectron2: the FocalNet backbones
(``build_focalnet_backbone``, ``build_focalnet_fpn_backbone``), the ``DINO`` and ``Mask2Former``
meta-architectures and their config keys, so that ``detectron2.modeling.build_model`` builds them.
"""
import warnings

from focalnet_pl.detector_weights import DetectorLoadReport, load_detector_weights
from focalnet_pl.focalnet import (
    VARIANTS,
    FocalNet,
    FocalNetConfig,
    count_parameters,
    create_focalnet,
    list_variants,
    variant_config,
)

with warnings.catch_warnings():
    # detectron2 scripts a few helpers when imported, which this torch deprecates; not the user's doing
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
    from focalnet_pl.d2 import FocalNetBackbone
    from focalnet_pl.dino import DINO
    from focalnet_pl.mask2former import Mask2Former

__version__ = "0.1.0"

__all__ = [
    "DINO", "VARIANTS", "DetectorLoadReport", "FocalNet", "FocalNetBackbone", "FocalNetConfig", "Mask2Former",
    "count_parameters", "create_focalnet",
    "list_variants", "load_detector_weights", "variant_config",
]

"""focalnet-pl: Focal Modulation Networks on PyTorch Lightning and detectron2."""
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

__version__ = "0.1.0"

__all__ = [
    "VARIANTS", "DetectorLoadReport", "FocalNet", "FocalNetConfig", "count_parameters", "create_focalnet",
    "list_variants", "load_detector_weights", "variant_config",
]

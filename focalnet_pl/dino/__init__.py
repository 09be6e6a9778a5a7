"""DINO detector: importing this package registers the ``DINO`` meta-architecture and ``MODEL.DINO`` config."""

from focalnet_pl.d2.config import CONFIG_EXTENSIONS
from focalnet_pl.dino.config import add_dino_config
from focalnet_pl.dino.criterion import SetCriterion
from focalnet_pl.dino.denoising import DenoisingMeta, DenoisingQueries, build_attention_mask, make_denoising_queries
from focalnet_pl.dino.dino import DINO
from focalnet_pl.dino.matcher import HungarianMatcher, focal_class_cost
from focalnet_pl.dino.transformer import DeformableTransformer

if add_dino_config not in CONFIG_EXTENSIONS:
    CONFIG_EXTENSIONS.append(add_dino_config)

__all__ = [
    "DINO",
    "DeformableTransformer",
    "DenoisingMeta",
    "DenoisingQueries",
    "HungarianMatcher",
    "SetCriterion",
    "add_dino_config",
    "build_attention_mask",
    "focal_class_cost",
    "make_denoising_queries",
]

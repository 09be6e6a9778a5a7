"""detectron2 config for FocalNet models: ``cfg.MODEL.FOCALNET`` and building a cfg from a nested dict."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

__all__ = [
    "CONFIG_EXTENSIONS",
    "NUM_CLASSES_KEYS",
    "add_focalnet_config",
    "build_detectron2_cfg",
    "get_dotted",
    "has_dotted",
]


def add_focalnet_config(cfg: CN) -> None:
    """Add the ``MODEL.FOCALNET`` node (idempotent).

    ``EMBED_DIM = 0`` and empty ``DEPTHS`` / ``FOCAL_LEVELS`` / ``FOCAL_WINDOWS`` mean "the variant's
    value"; set them only to build small test models or non-standard variants.
    """
    if "FOCALNET" in cfg.MODEL:
        return
    cfg.MODEL.FOCALNET = CN()
    node = cfg.MODEL.FOCALNET
    node.VARIANT = "focalnet_tiny_srf"
    node.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # stages <= FROZEN_STAGES are frozen (0 = patch embedding only, -1 = nothing)
    node.FROZEN_STAGES = -1
    node.GRAD_CHECKPOINTING = False
    # classification checkpoint (official / timm / Hugging Face / focalnet-pl layout); "" = random init
    node.WEIGHTS = ""
    # stochastic depth of the backbone (the detection recipes set it per model size)
    node.DROP_PATH_RATE = 0.2
    node.EMBED_DIM = 0
    node.DEPTHS = []
    node.FOCAL_LEVELS = []
    node.FOCAL_WINDOWS = []
    # Mask the padding of batched images (FocalNet, FPN, RPN, DINO and Mask2Former heads), so that each image
    # gets the result it gets alone, whatever the batch. The official models compute on the padding: False.
    # Applies to DINO, Mask2Former and PaddingMaskedRCNN (detectron2's GeneralizedRCNN never masks).
    cfg.MODEL.MASK_PADDING = True


#: Functions adding config nodes; :func:`build_detectron2_cfg` applies all of them, in order.
#: Modules that add a meta-architecture append their ``add_xxx_config`` here on import.
CONFIG_EXTENSIONS: list[Callable[[CN], None]] = [add_focalnet_config]

#: Dotted config key holding the number of classes, per ``MODEL.META_ARCHITECTURE``.
#: Modules that add a meta-architecture register theirs here on import.
NUM_CLASSES_KEYS: dict[str, str] = {
    "GeneralizedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
    "RetinaNet": "MODEL.RETINANET.NUM_CLASSES",
    "DINO": "MODEL.DINO.NUM_CLASSES",
    "PaddingMaskedRCNN": "MODEL.ROI_HEADS.NUM_CLASSES",
}


def get_dotted(cfg: CN, key: str) -> Any:
    """``cfg`` value at dotted ``key`` (e.g. ``"MODEL.ROI_HEADS.NUM_CLASSES"``)."""
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, CN) or part not in node:
            raise KeyError(f"detectron2 config has no key {key!r}")
        node = node[part]
    return node


def has_dotted(overrides: Mapping[str, Any], key: str) -> bool:
    """Whether the nested dict ``overrides`` sets dotted ``key``."""
    node: Any = overrides
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return True


def _merge(node: CN, overrides: Mapping[str, Any], prefix: str) -> None:
    for key, value in overrides.items():
        full_key = f"{prefix}{key}"
        if key not in node:
            raise KeyError(
                f"unknown detectron2 config key {full_key!r}; valid keys here: {sorted(node.keys())}"
            )
        current = node[key]
        if isinstance(current, CN):
            if not isinstance(value, Mapping):
                raise ValueError(f"detectron2 config key {full_key!r} is a section; got {value!r}")
            _merge(current, value, f"{full_key}.")
            continue
        if isinstance(value, Mapping):
            raise ValueError(f"detectron2 config key {full_key!r} is a value, not a section; got {value!r}")
        node[key] = _coerce(current, value, full_key)


def _coerce(current: Any, value: Any, full_key: str) -> Any:
    if isinstance(current, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(current)(value)
    same_kind = isinstance(current, bool) == isinstance(value, bool)
    if same_kind and isinstance(current, float) and isinstance(value, int):
        return float(value)
    if current is None or (same_kind and type(value) is type(current)):
        return value
    raise ValueError(
        f"detectron2 config key {full_key!r} expects {type(current).__name__} (default {current!r}); "
        f"got {type(value).__name__} {value!r}"
    )


def build_detectron2_cfg(overrides: Mapping[str, Any] | None = None) -> CN:
    """detectron2's default config with every :data:`CONFIG_EXTENSIONS` node, merged with ``overrides``.

    ``overrides`` is a nested dict (as written in YAML); an unknown key or a value of the wrong type
    raises naming the full dotted key. The returned config is frozen.
    """
    overrides = overrides or {}
    cfg = get_cfg()
    for extend in CONFIG_EXTENSIONS:
        extend(cfg)
    _merge(cfg, overrides, "")
    cfg.freeze()
    return cfg

"""Self-describing checkpoints: the architecture a task's checkpoints and exports carry, and the
comparison that names every difference when one is loaded into a config that disagrees.

The record (``checkpoint["focalnet_pl_architecture"]``, and ``architecture`` in export metadata) holds
the task, the FocalNet variant and its settings, the feature levels the head consumes, the classes and
their names, the input format and the evaluation size.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from focalnet_pl.focalnet import VARIANTS, FocalNetConfig

__all__ = ["ARCHITECTURE_KEY", "DATA_FIELDS", "check_architecture", "closest_variant", "describe_differences",
           "focalnet_settings", "require_task_checkpoint"]

log = logging.getLogger(__name__)

#: Where Lightning checkpoints keep the record.
ARCHITECTURE_KEY = "focalnet_pl_architecture"

#: Fields that describe the data rather than the model: a difference is logged, not an error.
DATA_FIELDS = ("class_names", "eval_size")

#: Training-only settings (they change no tensor and no output in evaluation).
_TRAINING_ONLY = ("drop_path_rate", "drop_rate")


def closest_variant(cfg: FocalNetConfig | Mapping[str, Any]) -> str | None:
    """The released variant with this width, depths, focal levels and stem (kernels may differ:
    the detection recipes enlarge them)."""
    values = asdict(cfg) if isinstance(cfg, FocalNetConfig) else dict(cfg)
    keys = ("embed_dim", "depths", "focal_levels", "use_conv_embed")
    for name, variant in VARIANTS.items():
        reference = asdict(variant)
        if all(tuple(values[k]) == tuple(reference[k]) if isinstance(reference[k], tuple) else values[k] == reference[k]
               for k in keys if k in values):
            return name
    return None


def focalnet_settings(cfg: FocalNetConfig, variant: str | None = None) -> dict[str, Any]:
    """``cfg`` as plain data, without its training-only settings, with the variant it was built as
    (else the released variant it matches)."""
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(cfg).items() if k not in _TRAINING_ONLY}
    return {"variant": variant or closest_variant(cfg), **settings}


def _flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def describe_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """``"field: checkpoint X, config Y"`` for every field present in both records that differs."""
    ours, theirs = _flatten(current), _flatten(saved)
    return [f"{key}: checkpoint {theirs[key]!r}, config {ours[key]!r}"
            for key in theirs if key in ours and theirs[key] != ours[key] and theirs[key] is not None
            and ours[key] is not None]


def check_architecture(saved: Mapping[str, Any] | None, current: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Raise ``ValueError`` naming every difference between a checkpoint's record and the configured
    model's when the model differs; differences of data (class names, evaluation size) are logged."""
    if not saved:
        return
    differences = describe_differences(saved, current)
    model = [d for d in differences if not d.startswith(DATA_FIELDS)]
    if model:
        raise ValueError(f"{source} was written by another architecture than this config builds: " + "; ".join(differences))
    if differences:
        log.warning("%s was written for other data than this config: %s", source, "; ".join(differences))


#: Entries of a Lightning checkpoint (a sharded FSDP one has no ``state_dict``: its weights are read apart).
_LIGHTNING_KEYS = ("state_dict", "pytorch-lightning_version", "global_step", ARCHITECTURE_KEY)


def require_task_checkpoint(checkpoint: Mapping[str, Any], weights_argument: str) -> None:
    """Refuse, pointing to ``weights_argument``, a file given as ``--ckpt_path`` that is no Lightning
    checkpoint (a released or pretrained weights file)."""
    if not any(key in checkpoint for key in _LIGHTNING_KEYS):
        raise ValueError(
            f"--ckpt_path takes a Lightning checkpoint of this task; this file has none of {list(_LIGHTNING_KEYS)} (top-level keys "
            f"{sorted(checkpoint)[:8]}). Released or pretrained weights go in {weights_argument} "
            "(`focalnet-pl inspect FILE` tells what it is)"
        )

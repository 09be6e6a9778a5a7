"""``focalnet-pl inspect FILE``: what a checkpoint is, ours or a recognised foreign one.

    focalnet-pl inspect runs/.../last.ckpt            # our Lightning checkpoint: task, architecture, classes
    focalnet-pl inspect exports/backbone.safetensors  # our export
    focalnet-pl inspect focalnet_tiny_srf_maskrcnn_1x.pth [--json]   # official, timm, HF, mmdetection, DINO ...

FILE may also be an https URL or ``zoo:NAME`` (fetched into the download cache).
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from focalnet_pl.architecture import ARCHITECTURE_KEY, closest_variant
from focalnet_pl.detector_weights import (
    DETECTOR_LAYOUTS,
    FocalNetPLLayout,
    import_layout_modules,
    read_detector_checkpoint,
)
from focalnet_pl.io import load_checkpoint
from focalnet_pl.labels import imagenet_class_names
from focalnet_pl.weights import (
    CheckpointError,
    focalnet_architecture,
    read_safetensors_metadata,
    resolve_source,
    split_focalnet_layout,
)

__all__ = ["describe_checkpoint", "main"]

_SHOWN_NAMES = 8


def _parameters(tensors: Mapping[str, Any]) -> int:
    return sum(v.numel() for v in tensors.values() if isinstance(v, Tensor) and v.is_floating_point())


def _flat_tensors(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """The tensor dict inside a checkpoint (``state_dict`` / ``model`` / ``module`` / top level)."""
    for key in ("state_dict", "model", "module", "model_state"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
            return {k: v for k, v in inner.items() if isinstance(v, Tensor)}
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _backbone(tensors: Mapping[str, Tensor]) -> tuple[str | None, dict[str, Any] | None]:
    """``(layout, architecture)`` of the FocalNet among ``tensors``, or ``(None, None)``."""
    try:
        layout, state, _ = split_focalnet_layout(dict(tensors))
    except CheckpointError:
        return None, None
    architecture = focalnet_architecture(state)
    levels = architecture["focal_levels"]
    return layout, {"variant": closest_variant({
        "embed_dim": architecture["embed_dim"], "depths": architecture["depths"],
        "focal_levels": levels, "use_conv_embed": architecture["use_conv_embed"]}), **architecture}


def _ours(obj: Mapping[str, Any]) -> dict[str, Any]:
    record = obj.get(ARCHITECTURE_KEY) or {}
    state = obj["state_dict"]
    model = {k: v for k, v in state.items() if k.startswith("model.")}
    info: dict[str, Any] = {"layout": "focalnet-pl Lightning checkpoint", "architecture": record or None,
                            "epoch": obj.get("epoch"), "global_step": obj.get("global_step")}
    if not record:  # written before checkpoints carried their architecture
        _, info["architecture"] = _backbone({k.removeprefix("model."): v for k, v in model.items()})
        detection = obj.get("detection") or {}
        info["classes"] = detection.get("thing_classes") or (obj.get("hyper_parameters") or {}).get("class_names")
    info["parameters"] = _parameters(model)
    return info


def describe_checkpoint(source: str | Path) -> dict[str, Any]:
    """What ``source`` holds: its layout, architecture, classes and parameter count (a dict)."""
    path = resolve_source(source)
    info: dict[str, Any] = {"file": str(path)}
    if path.suffix == ".safetensors":
        metadata = read_safetensors_metadata(path)
        tensors = load_checkpoint(path)
        if metadata.get("format") == "focalnet-pl":
            info["layout"] = f"focalnet-pl export (part: {metadata.get('part')})"
            info["architecture"] = json.loads(metadata.get("architecture", "null")) or {
                "focalnet": json.loads(metadata["focalnet_config"])}
            info["parameters"] = _parameters(tensors)
            return _with_classes(info)
        obj: Mapping[str, Any] = tensors
    else:
        import_layout_modules()
        obj = read_detector_checkpoint(path)
    if isinstance(obj.get("state_dict"), Mapping) and (ARCHITECTURE_KEY in obj or "pytorch-lightning_version" in obj):
        return _with_classes({**info, **_ours(obj)})
    tensors = _flat_tensors(obj)
    info["parameters"] = _parameters(tensors)
    backbone_layout, architecture = _backbone(tensors)
    for layout in DETECTOR_LAYOUTS:
        if not isinstance(layout, FocalNetPLLayout) and layout.matches(obj):
            info["layout"] = layout.name
            describe = getattr(layout, "describe", None)
            info.update(describe(obj) if callable(describe) else {})
            info["architecture"] = {"focalnet": architecture}
            return _with_classes(info)
    if backbone_layout is None:
        raise CheckpointError(f"{path}: not a checkpoint of a recognised layout; first keys: {list(tensors)[:8]}")
    info["layout"] = f"FocalNet classifier/backbone ({backbone_layout} names)"
    info["architecture"] = {"focalnet": architecture}
    if architecture["num_classes"]:
        info["num_classes"] = architecture["num_classes"]
        info["classes"] = imagenet_class_names(architecture["num_classes"])
    return _with_classes(info)


def _with_classes(info: dict[str, Any]) -> dict[str, Any]:
    """``num_classes`` and ``classes`` filled from the architecture record when it has them."""
    record = info.get("architecture") or {}
    if record.get("class_names") and not info.get("classes"):
        info["classes"] = record["class_names"]
    if record.get("num_classes") and not info.get("num_classes"):
        info["num_classes"] = record["num_classes"]
    if info.get("classes") and not info.get("num_classes"):
        info["num_classes"] = len(info["classes"])
    return info


def _format(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{k} {_format(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def main(argv: list[str]) -> None:
    """``focalnet-pl inspect FILE [--json]``."""
    parser = argparse.ArgumentParser(prog="focalnet-pl inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="checkpoint path, https URL or zoo:NAME")
    parser.add_argument("--json", action="store_true", help="print the description as JSON")
    args = parser.parse_args(argv)
    info = describe_checkpoint(args.file)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return
    classes = info.pop("classes", None)
    parameters = info.pop("parameters", None)
    architecture = info.pop("architecture", None) or {}
    for key, value in info.items():
        if value is not None and key != "num_classes":
            print(f"{key + ':':14s} {_format(value)}")
    for key, value in architecture.items():
        if value is not None and key not in ("class_names", "num_classes"):
            print(f"{key + ':':14s} {_format(value)}")
    if info.get("num_classes") or classes:
        shown = " | ".join(classes[:_SHOWN_NAMES]) + (" | ..." if len(classes) > _SHOWN_NAMES else "") if classes else "names unknown"
        print(f"{'classes:':14s} {info.get('num_classes') or len(classes)} ({shown})")
    if parameters is not None:
        print(f"{'parameters:':14s} {parameters / 1e6:.2f} M ({parameters:,})")

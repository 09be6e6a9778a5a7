"""Reading, converting and loading FocalNet weights.

Layouts recognised (anywhere under a prefix such as ``model.`` or ``backbone.``):

* official microsoft/FocalNet (``{"model": state_dict}``; also its detection checkpoints) — the
  names our modules use;
* timm (``stem.*``, ``ls1.gamma``, ``head.fc.*``, 1x1 convs);
* Hugging Face transformers (``focalnet.embeddings.*``, ``focalnet.encoder.stages.*``, ``classifier.*``).

Files are read with ``torch.load(weights_only=True)`` or safetensors; nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


_ANCHORS = {
    "official": "patch_embed.proj.weight",
    "timm": "stem.proj.weight",
    "hf": "embeddings.patch_embeddings.projection.weight",
}


def _is_url(source: str) -> bool:
    return "://" in source


def resolve_source(source: str | Path) -> Path:
    """A local path for ``source``; https URLs are downloaded once to the torch hub cache."""
    source = str(source)
    if _is_url(source):
        parsed = urlparse(source)
        if parsed.scheme != "https":
            raise CheckpointError(f"Refusing to download weights over {parsed.scheme!r}: only https URLs are allowed ({source})")
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        cache.mkdir(parents=True, exist_ok=True)
        target = cache / Path(parsed.path).name
        if not target.exists():
            log.info("Downloading %s to %s", source, target)
            torch.hub.download_url_to_file(source, str(target), progress=True)
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    return path


def read_state_dict(source: str | Path) -> StateDict:
    """Read a flat ``name -> tensor`` mapping from a .safetensors, .pth/.pt/.ckpt or .bin file."""
    path = resolve_source(source)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"Cannot read safetensors file {path}: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refused to load {path}: it contains pickled objects that are not plain tensors/containers "
            f"(loading it would run code). Only weights are accepted; re-save it as a state dict or safetensors. "
            f"Details: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"Cannot read checkpoint {path} (corrupt or not a torch file): {err}") from err
    return _unwrap(obj, path)


def _unwrap(obj: object, path: Path) -> StateDict:
    for _ in range(3):
        if isinstance(obj, dict) and not _is_tensor_dict(obj):
            for key in ("state_dict", "model", "model_state", "module", "ema"):
                if key in obj and isinstance(obj[key], dict):
                    obj = obj[key]
                    break
            else:
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors (top-level keys: {sorted(obj)[:10]})")
    return tensors


def _is_tensor_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def detect_layout(state_dict: StateDict) -> tuple[str, str]:
    """``(layout, prefix)`` of the FocalNet weights inside ``state_dict`` (shortest prefix wins)."""
    found = []
    for layout, anchor in _ANCHORS.items():
        for key in state_dict:
            if key.endswith(anchor) and (key == anchor or key[: -len(anchor)].endswith(".")):
                found.append((len(key) - len(anchor), layout, key[: -len(anchor)]))
    if not found:
        raise CheckpointError(
            "No FocalNet weights found: expected a key ending in one of "
            f"{sorted(_ANCHORS.values())}; first keys are {list(state_dict)[:8]}"
        )
    _, layout, prefix = min(found)
    return layout, prefix


def _from_timm(key: str) -> str:
    key = re.sub(r"^stem\.", "patch_embed.", key)
    key = re.sub(r"^layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) - 1}.downsample.", key)
    key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)
    key = re.sub(r"\.norm([12])_post\.", r".norm\1.", key)
    key = key.replace(".modulation.norm.", ".modulation.ln.")
    return re.sub(r"^head\.fc\.", "head.", key)


_HF_RULES: list[tuple[str, str | Callable[[re.Match], str]]] = [
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^embeddings\.norm\.", "patch_embed.norm."),
    (r"^encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"layers.\1.blocks.\2."),
    (r"^encoder\.stages\.(\d+)\.downsample\.projection\.", r"layers.\1.downsample.proj."),
    (r"^encoder\.stages\.(\d+)\.downsample\.norm\.", r"layers.\1.downsample.norm."),
    (r"\.modulation\.projection_in\.", ".modulation.f."),
    (r"\.modulation\.projection_context\.", ".modulation.h."),
    (r"\.modulation\.projection_out\.", ".modulation.proj."),
    (r"\.modulation\.layernorm\.", ".modulation.ln."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]


def _from_hf(key: str) -> str:
    for pattern, repl in _HF_RULES:
        key = re.sub(pattern, repl, key)
    return key


def to_focalnet_layout(state_dict: StateDict) -> StateDict:
    """Convert any recognised layout to ours (the official names), dropping non-FocalNet keys."""
    layout, prefix = detect_layout(state_dict)
    if layout == "hf":
        # HF classifiers keep the head outside the ``focalnet.`` sub-module
        outer = prefix[: -len("focalnet.")] if prefix.endswith("focalnet.") else prefix
        items = {}
        for k, v in state_dict.items():
            if k.startswith(prefix):
                items[k[len(prefix):]] = v
            elif k.startswith(outer + "classifier."):
                items[k[len(outer):]] = v
        return {_from_hf(k): v for k, v in items.items()}
    items = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if layout == "timm":
        return {_from_timm(k): v for k, v in items.items()}
    return items


@dataclass
class LoadReport:
    """What :func:`load_weights` did besides copying matching tensors."""

    source: str
    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    wrong_shape: list[str] = field(default_factory=list)
    expanded: list[str] = field(default_factory=list)
    reinitialised: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def problems(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "wrong_shape"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:25]) + (f", ... ({len(keys) - 25} more)" if len(keys) > 25 else "")
                parts.append(f"{name} ({len(keys)}): {shown}")
        return "; ".join(parts)


def _expand_gates(src: torch.Tensor, dst: torch.Tensor, dim: int) -> torch.Tensor:
    """Rows of ``f`` for more focal levels: q/ctx and known gates copied, new level gates zero, global gate last."""
    src_levels = src.shape[0] - 2 * dim - 1
    out = torch.zeros_like(dst)
    out[: 2 * dim + src_levels] = src[: 2 * dim + src_levels]
    out[-1] = src[-1]
    return out


def _expand_kernel(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Zero-pad a depthwise kernel to a larger odd size, centred."""
    pad = (dst.shape[-1] - src.shape[-1]) // 2
    out = torch.zeros_like(dst)
    out[..., pad : pad + src.shape[-2], pad : pad + src.shape[-1]] = src
    return out


def _adapt(key: str, value: torch.Tensor, target: torch.Tensor, model_dim: Callable[[str], int]) -> torch.Tensor | None:
    """``value`` reshaped/expanded to ``target``'s shape, or None when it cannot be."""
    if value.shape == target.shape:
        return value
    if value.numel() == target.numel():  # 1x1 conv <-> linear
        return value.reshape(target.shape)
    if re.search(r"\.modulation\.f\.(weight|bias)$", key) and value.shape[0] < target.shape[0] \
            and value.shape[1:] == target.shape[1:]:
        return _expand_gates(value, target, model_dim(key))
    if re.search(r"\.focal_layers\.\d+\.0\.weight$", key) and value.shape[:2] == target.shape[:2] \
            and value.shape[-1] < target.shape[-1] and (target.shape[-1] - value.shape[-1]) % 2 == 0:
        return _expand_kernel(value, target)
    return None


def load_weights(model: nn.Module, source: str | Path | StateDict, strict: bool = True) -> LoadReport:
    """Load FocalNet weights into ``model`` (a :class:`~focalnet_pl.focalnet.FocalNet`).

    * The classifier head is dropped for dense backbones, and re-initialised (and logged) when
      the number of classes differs; dense output norms absent from a classification checkpoint
      are initialised fresh.
    * A model with more focal levels or larger focal kernels than the checkpoint gets
      zero-padded kernels and zero gate rows for the new levels (reported).
    * Anything else that does not fit raises :class:`CheckpointError` listing missing,
      unexpected and wrong-shape keys (``strict=False`` loads what fits and logs the rest).
    """
    name = source if isinstance(source, (str, Path)) else "<state dict>"
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else source
    layout, _ = detect_layout(raw)
    state = to_focalnet_layout(raw)
    target = model.state_dict()
    report = LoadReport(source=str(name), layout=layout)
    features_only = getattr(model, "features_only", False)

    def block_dim(key: str) -> int:
        return target[re.sub(r"\.f\.(weight|bias)$", ".h.weight", key)].shape[0]

    loaded: StateDict = {}
    mismatched: set[str] = set()
    for key, value in state.items():
        if features_only and (key.startswith("head.") or key.startswith("norm.")):
            report.dropped.append(key)
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        if key.startswith("head.") and value.shape != target[key].shape:
            report.reinitialised.append(key)
            continue
        adapted = _adapt(key, value, target[key], block_dim)
        if adapted is None:
            mismatched.add(key)
            report.wrong_shape.append(f"{key} (checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)})")
            continue
        if adapted.shape != value.shape and adapted.numel() != value.numel():
            report.expanded.append(key)
        loaded[key] = adapted.to(dtype=target[key].dtype)

    for key in target:
        if key in loaded or key in mismatched or key in report.reinitialised:
            continue
        new_output_norm = features_only and re.match(r"^norm\d\.", key)
        new_level = re.search(r"\.focal_layers\.\d+\.0\.weight$", key) and report.expanded
        if new_output_norm or new_level:
            report.reinitialised.append(key)
        else:
            report.missing.append(key)

    if strict and (report.missing or report.unexpected or report.wrong_shape):
        raise CheckpointError(f"Checkpoint {name} ({layout} layout) does not match the model: {report.problems()}")
    model.load_state_dict(loaded, strict=False)
    log.info("Loaded %d tensors from %s (%s layout)", len(loaded), name, layout)
    if report.expanded:
        log.info("Expanded to more focal levels / larger kernels: %d tensors (%s ...)", len(report.expanded), report.expanded[0])
    if report.reinitialised:
        log.info("Initialised fresh (not in the checkpoint or new head size): %s", ", ".join(report.reinitialised[:10]))
    if report.dropped:
        log.info("Dropped for the dense backbone: %s", ", ".join(report.dropped))
    if report.problems():
        log.warning("Not loaded (strict=False): %s", report.problems())
    return report


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights as safetensors; the FocalNet config (if any) goes in the metadata."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    meta = dict(metadata or {})
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
        meta.setdefault("focalnet_config", json.dumps(asdict(cfg)))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})

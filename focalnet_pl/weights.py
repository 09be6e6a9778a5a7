"""Reading, converting and loading FocalNet weights.

Layouts recognised (anywhere under a prefix such as ``model.`` or ``backbone.``):

* official microsoft/FocalNet (``{"model": state_dict}``; also its detection checkpoints) — the
  names our modules use;
* timm (``stem.*``, ``ls1.gamma``, ``head.fc.*``, 1x1 convs);
* Hugging Face transformers (``focalnet.embeddings.*``, ``focalnet.encoder.stages.*``, ``classifier.*``).

Files are read by :mod:`focalnet_pl.io` (``weights_only=True`` or safetensors; nothing runs code).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import torch
from torch import nn

from focalnet_pl.io import CheckpointError, atomic_write, load_checkpoint, save_safetensors_file

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


_ANCHORS = {
    "official": "patch_embed.proj.weight",
    "timm": "stem.proj.weight",
    "hf": "embeddings.patch_embeddings.projection.weight",
}


def _is_url(source: str) -> bool:
    return "://" in source


#: Set to 1 to never download: a file missing from the cache fails at once, naming where to put it.
OFFLINE_ENV = "FOCALNET_PL_OFFLINE"


def cache_path(url: str) -> Path:
    """Where the download of ``url`` is kept: ``<torch hub dir>/focalnet_pl/<sha256 of the URL>/<file name>``.

    Keyed by the whole URL, so two URLs that end in the same file name (every Hugging Face
    ``.../resolve/main/pytorch_model.bin``) never share a file.
    """
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    return Path(torch.hub.get_dir()) / "focalnet_pl" / key / (Path(urlparse(url).path).name or "download")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_sha256(path: Path, sha256: str | None, url: str) -> None:
    if sha256 is not None and (actual := file_sha256(path)) != sha256.lower():
        raise CheckpointError(f"{path} (from {url}) has sha256 {actual}, expected {sha256}: a partial or different "
                              "file; delete it and download again")


def _download(url: str, target: Path, timeout: float = 30.0) -> None:
    missing = (f"Put the file there by hand (download {url} on a machine with network), or pass its local path "
               f"instead of the URL / zoo name.")
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise CheckpointError(f"{url} is not in the download cache and {OFFLINE_ENV} is set: expected at {target}. {missing}")
    log.info("Downloading %s to %s", url, target)

    def copy(response, tmp: Path) -> None:
        with open(tmp, "wb") as out:
            shutil.copyfileobj(response, out, 1 << 24)

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            atomic_write(target, lambda tmp: copy(response, tmp))
    except (OSError, urllib.error.URLError) as err:
        raise CheckpointError(f"Cannot download {url} ({err}); it is expected at {target}. {missing}") from err


def resolve_source(source: str | Path, sha256: str | None = None) -> Path:
    """A local path for ``source``: a file path, an https URL or ``zoo:NAME`` (see ``focalnet-pl zoo``).

    URLs are downloaded once into :func:`cache_path` and checked against ``sha256`` (the zoo's, for
    ``zoo:NAME``) when one is known; without network the error names the URL and the path to put
    the file at.
    """
    source = str(source)
    if source.startswith("zoo:"):
        from focalnet_pl.zoo import zoo_entry

        try:
            entry = zoo_entry(source)
        except KeyError as err:
            raise CheckpointError(str(err.args[0])) from err
        source, sha256 = entry.url, sha256 or entry.sha256
    if _is_url(source):
        parsed = urlparse(source)
        if parsed.scheme != "https":
            raise CheckpointError(f"Refusing to download weights over {parsed.scheme!r}: only https URLs are allowed ({source})")
        target = cache_path(source)
        if not target.exists():
            _download(source, target)
            try:
                _check_sha256(target, sha256, source)
            except CheckpointError:
                target.unlink()
                raise
        _check_sha256(target, sha256, source)  # also a file put in the cache by hand
        return target
    path = Path(source).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    return path


def read_state_dict(source: str | Path) -> StateDict:
    """Read a flat ``name -> tensor`` mapping from a .safetensors, .pth/.pt/.ckpt or .bin file."""
    path = resolve_source(source)
    return _unwrap(load_checkpoint(path), path)


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


def split_focalnet_layout(state_dict: StateDict) -> tuple[str, StateDict, list[str]]:
    """``(layout, FocalNet tensors in our names, keys that are not FocalNet weights)`` of ``state_dict``.

    The last are what a detector checkpoint holds besides its backbone (``neck.*``, ``rpn_head.*``,
    ``transformer.*``, ...).
    """
    layout, prefix = detect_layout(state_dict)
    # prefix of the kept keys -> how much of it to strip (HF classifiers keep the head outside ``focalnet.``)
    strips = {prefix: len(prefix)}
    if layout == "hf":
        outer = prefix.removesuffix("focalnet.")
        strips[outer + "classifier."] = len(outer)
    items: StateDict = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        start = next((p for p in strips if key.startswith(p)), None)
        if start is None:
            ignored.append(key)
        else:
            items[key[strips[start]:]] = value
    rename = {"hf": _from_hf, "timm": _from_timm}.get(layout)
    return layout, ({rename(k): v for k, v in items.items()} if rename else items), ignored


def to_focalnet_layout(state_dict: StateDict) -> StateDict:
    """Convert any recognised layout to ours (the official names), dropping non-FocalNet keys."""
    return split_focalnet_layout(state_dict)[1]


def focalnet_architecture(state: StateDict) -> dict[str, object]:
    """What a FocalNet state dict (our names) says of its architecture: widths, depths, focal levels
    and kernels per stage, stem, layer scale, post-modulation norm, classifier outputs."""
    stages = sorted({int(m[1]) for k in state if (m := re.match(r"^layers\.(\d+)\.", k))})
    depths = [len({m[1] for k in state if (m := re.match(rf"^layers\.{i}\.blocks\.(\d+)\.", k))}) for i in stages]
    levels = [len({m[1] for k in state if (m := re.match(rf"^layers\.{i}\.blocks\.0\.modulation\.focal_layers\.(\d+)\.", k))})
              for i in stages]
    windows = [int(state[f"layers.{i}.blocks.0.modulation.focal_layers.0.0.weight"].shape[-1])
               for i in stages if f"layers.{i}.blocks.0.modulation.focal_layers.0.0.weight" in state]
    stem = state.get("patch_embed.proj.weight")
    head = state.get("head.weight")
    return {
        "embed_dim": int(stem.shape[0]) if stem is not None else None,
        "depths": tuple(depths),
        "focal_levels": tuple(levels),
        "focal_kernels": tuple(windows),
        "use_conv_embed": bool(stem is not None and stem.shape[-1] == 7),
        "use_layerscale": any(k.endswith(".gamma_1") for k in state),
        "use_postln_in_modulation": any(".modulation.ln." in k for k in state),
        "num_classes": int(head.shape[0]) if head is not None else None,
    }


def architecture_differences(checkpoint: dict[str, object], model: dict[str, object]) -> list[str]:
    """``"name: checkpoint X, model Y"`` for every entry of two architecture dicts that differs."""
    return [f"{key}: checkpoint {checkpoint.get(key)}, model {model.get(key)}"
            for key in dict.fromkeys([*checkpoint, *model]) if checkpoint.get(key) != model.get(key)]


def _summarise_keys(keys: list[str]) -> str:
    """``neck.* (8), rpn_head.* (6), ...``: the top-level groups of ``keys``."""
    groups: dict[str, int] = {}
    for key in keys:
        group = key.split(".", 1)[0]
        groups[group] = groups.get(group, 0) + 1
    return ", ".join(f"{group}.* ({count})" for group, count in groups.items())


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
    ignored: list[str] = field(default_factory=list)  # file keys outside the FocalNet (detector neck / heads)
    mapped_head: str = ""  # how a classifier head of other classes was mapped (ImageNet-22K -> 1K)

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
    * An ImageNet-22K head in a 1000-class model keeps the rows of the ImageNet-1K classes
      (matched by WordNet synset, :func:`focalnet_pl.labels.imagenet_head_rows`).
    * Tensors of the file outside the FocalNet (the neck and heads of a full detector checkpoint) are
      listed in ``report.ignored`` and logged, pointing to :func:`focalnet_pl.load_detector_weights`.
    * Anything else that does not fit raises :class:`CheckpointError` listing missing,
      unexpected and wrong-shape keys and how the checkpoint's architecture differs from the model's
      (``strict=False`` loads what fits and logs the rest).
    """
    from focalnet_pl.labels import imagenet_head_rows

    name = source if isinstance(source, (str, Path)) else "<state dict>"
    raw = read_state_dict(source) if isinstance(source, (str, Path)) else source
    layout, state, ignored = split_focalnet_layout(raw)
    target = model.state_dict()
    report = LoadReport(source=str(name), layout=layout, ignored=ignored)
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
            rows = imagenet_head_rows(value.shape[0], target[key].shape[0])
            if rows is None or value.shape[1:] != target[key].shape[1:]:
                report.reinitialised.append(key)
                continue
            value = value[rows]
            report.mapped_head = f"{len(state['head.weight'])}-class ImageNet head -> rows of the {len(rows)} classes"
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
        differences = architecture_differences(focalnet_architecture(state), focalnet_architecture(target))
        differs = f". Architecture differs: {'; '.join(differences)}" if differences else ""
        raise CheckpointError(f"Checkpoint {name} ({layout} layout) does not match the model: {report.problems()}{differs}")
    model.load_state_dict(loaded, strict=False)
    log.info("Loaded %d tensors from %s (%s layout)", len(loaded), name, layout)
    if report.ignored:
        log.warning(
            "%s holds %d tensors besides the FocalNet (%s); they were NOT loaded. A full detector checkpoint? "
            "Load it with MODEL.WEIGHTS / focalnet_pl.load_detector_weights to use its neck and heads.",
            name, len(report.ignored), _summarise_keys(report.ignored),
        )
    if report.mapped_head:
        log.info("Classifier head: %s", report.mapped_head)
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

    meta = dict(metadata or {})
    cfg = getattr(model, "cfg", None)
    if cfg is not None and hasattr(cfg, "__dataclass_fields__"):
        meta.setdefault("focalnet_config", json.dumps(asdict(cfg)))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save_safetensors_file(state, path, meta)


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})

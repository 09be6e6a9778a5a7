"""Full detector checkpoints (DINO, Mask R-CNN, Mask2Former) into our detectron2 models.

:func:`load_detector_weights` is the one entry point. A checkpoint is read safely
(:func:`read_detector_checkpoint`), recognised by one of the registered :class:`DetectorLayout` s
(official FocalNet-DINO / IDEA DINO, detrex, mmdetection Mask R-CNN, Mask2Former, our own files),
converted to our parameter names, and checked against the model:

* class-dependent tensors (class heads, label embeddings) are selected by dataset category id when
  the checkpoint's class rows are known (COCO's 91-row id layout into our contiguous 80), and
  re-initialised, with the reason in the report, when the class set differs (fine-tuning);
* everything else must fit: a tensor of another shape, a missing key or a key the model does not use
  raises :class:`~focalnet_pl.weights.CheckpointError` naming what differs (``strict=False`` loads
  what fits and logs the rest). Nothing is dropped without being reported: tensors left out on purpose
  (parts excluded by ``checkpoint_filter``, loss constants) are listed as ``skipped`` with the reason.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from focalnet_pl.io import SAFE_CHECKPOINT_GLOBALS, load_checkpoint
from focalnet_pl.weights import (
    CheckpointError,
    StateDict,
    architecture_differences,
    focalnet_architecture,
    resolve_source,
)

__all__ = [
    "DETECTOR_LAYOUTS",
    "ClassRows",
    "ConvertedState",
    "DetectorLayout",
    "DetectorLoadReport",
    "SAFE_CHECKPOINT_GLOBALS",
    "load_detector_weights",
    "read_detector_checkpoint",
    "register_detector_layout",
]

log = logging.getLogger(__name__)


def read_detector_checkpoint(source: str | Path, allowed_globals: Sequence[Any] | None = None) -> dict[str, Any]:
    """The top-level object of a detector checkpoint (a path, URL or ``zoo:`` name), read by
    :func:`focalnet_pl.io.load_checkpoint`: a ``.safetensors`` file as ``{"model": tensors}``, a
    detectron2 ``.pkl`` file of numpy arrays (the official Mask2Former releases) or a torch pickle
    holding only tensors, plain containers and ``allowed_globals`` (default :data:`SAFE_CHECKPOINT_GLOBALS`).
    """
    path = resolve_source(source)
    obj = load_checkpoint(path, allowed_globals)
    if path.suffix == ".safetensors":
        return {"model": obj}
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__})")
    return dict(obj)


@dataclass(frozen=True)
class ClassRows:
    """How the rows of a class-dependent tensor map to classes.

    ``source_ids[i]`` is the dataset category id of the checkpoint's class ``i`` (``None``: unknown,
    contiguous); ``source_names[i]`` its name where the checkpoint's dataset is known (COCO; ``None``
    for an unused id), so that another dataset that reuses the ids for other classes is told apart;
    each class owns ``rows_per_class`` consecutive entries along ``dim`` (4 for a class-specific box
    regressor); ``extra_rows`` trailing entries (a background row) are not classes and are kept as
    they are.
    """

    source_ids: tuple[int, ...] | None = None
    dim: int = 0
    rows_per_class: int = 1
    extra_rows: int = 0
    source_names: tuple[str | None, ...] | None = None


@dataclass
class ConvertedState:
    """A checkpoint in our model's parameter names, as a :class:`DetectorLayout` converts it."""

    tensors: StateDict
    converted: set[str] = field(default_factory=set)  # our keys whose tensor was renamed, reshaped or merged
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys the model has no use for
    class_rows: dict[str, ClassRows] = field(default_factory=dict)  # our class-dependent keys
    skipped: list[str] = field(default_factory=list)  # "checkpoint key: reason" not loaded on purpose


class DetectorLayout(Protocol):
    """A checkpoint layout that :func:`load_detector_weights` recognises and converts."""

    name: str

    def matches(self, checkpoint: Mapping[str, Any]) -> bool:
        """Whether ``checkpoint`` (the file's top-level dict) is in this layout."""

    def convert(self, checkpoint: Mapping[str, Any], model: nn.Module) -> ConvertedState:
        """The checkpoint's tensors in ``model``'s names; raises :class:`CheckpointError` for an
        architecture the model does not have (other width, levels, number of scales, head), saying
        what differs."""


#: Recognised layouts, tried in order (our own layout last, as the fallback).
DETECTOR_LAYOUTS: list[DetectorLayout] = []

#: Modules that register their layouts on import (imported by :func:`detect_detector_layout`).
LAYOUT_MODULES: list[str] = [
    "focalnet_pl.dino.layouts", "focalnet_pl.d2.mmdet_weights", "focalnet_pl.mask2former.weights",
]



def register_detector_layout(layout: DetectorLayout, first: bool = True) -> DetectorLayout:
    """Add ``layout`` to :data:`DETECTOR_LAYOUTS` (before the others unless ``first=False``); idempotent."""
    if all(existing.name != layout.name for existing in DETECTOR_LAYOUTS):
        DETECTOR_LAYOUTS.insert(0 if first else len(DETECTOR_LAYOUTS), layout)
    return layout


@dataclass
class DetectorLoadReport:
    """What :func:`load_detector_weights` did with every tensor of the model and of the file."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)  # model keys copied as they are
    converted: list[str] = field(default_factory=list)  # model keys filled from renamed/reshaped/selected tensors
    reinitialised: list[str] = field(default_factory=list)  # "key: reason", left at the model's init on purpose
    unexpected: list[str] = field(default_factory=list)  # file keys the model does not use
    skipped: list[str] = field(default_factory=list)  # "key: reason", file tensors left out on purpose
    missing: list[str] = field(default_factory=list)  # model keys the file lacks
    wrong_shape: list[str] = field(default_factory=list)  # "key (file shape vs model shape)"

    def problems(self) -> str:
        """The missing / unexpected / wrong-shape keys, one clause each (empty when everything fits)."""
        parts = []
        for name in ("missing", "unexpected", "wrong_shape"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"{name} ({len(keys)}): {shown}")
        return "; ".join(parts)

    def summary(self) -> str:
        counts = ", ".join(
            f"{len(getattr(self, name))} {name.replace('_', ' ')}"
            for name in ("loaded", "converted", "reinitialised", "skipped", "unexpected", "missing", "wrong_shape")
        )
        return f"{self.source} ({self.layout} layout): {counts}"


def _class_count(spec: ClassRows, size: int) -> int:
    return (size - spec.extra_rows) // spec.rows_per_class


def _select_class_rows(value: Tensor, spec: ClassRows, class_ids: Sequence[int]) -> Tensor:
    """Rows of ``value`` for the dataset ids ``class_ids`` (in our contiguous order), extra rows kept."""
    assert spec.source_ids is not None
    position = {dataset_id: index for index, dataset_id in enumerate(spec.source_ids)}
    rows = []
    for dataset_id in class_ids:
        start = position[dataset_id] * spec.rows_per_class
        rows.extend(range(start, start + spec.rows_per_class))
    total = value.shape[spec.dim]
    rows.extend(range(total - spec.extra_rows, total))
    return value.index_select(spec.dim, torch.as_tensor(rows, dtype=torch.long))


def _renamed_classes(spec: ClassRows, class_ids: Sequence[int],
                     class_names: Sequence[str] | None) -> list[tuple[int, str, str | None]]:
    """``(id, dataset name, checkpoint name)`` of the dataset classes whose id names another class in
    the checkpoint (only where both sides know their names)."""
    if class_names is None or spec.source_names is None or spec.source_ids is None:
        return []
    names = dict(zip(spec.source_ids, spec.source_names))
    return [(i, name, names[i]) for i, name in zip(class_ids, class_names)
            if i in names and (names[i] or "").lower() != name.lower()]


def _fit_class_rows(key: str, value: Tensor, target: Tensor, spec: ClassRows, class_ids: Sequence[int] | None,
                    class_names: Sequence[str] | None = None) -> tuple[Tensor | None, str]:
    """``(tensor, how)`` for a class-dependent key: rows selected by id, copied, or ``None`` and the
    reason it is left at its initial value."""
    other_dims_fit = value.dim() == target.dim() and all(
        a == b for d, (a, b) in enumerate(zip(value.shape, target.shape)) if d != spec.dim
    )
    if not other_dims_fit:
        return None, f"checkpoint {tuple(value.shape)} vs model {tuple(target.shape)} beyond the class rows"
    if class_ids is not None and spec.source_ids is not None:
        absent = [i for i in class_ids if i not in set(spec.source_ids)]
        renamed = _renamed_classes(spec, class_ids, class_names)
        if not absent and not renamed and len(class_ids) == _class_count(spec, target.shape[spec.dim]):
            return _select_class_rows(value, spec, class_ids), "selected"
        if renamed:
            shown = ", ".join(f"id {i} is {name!r} in the dataset, {theirs!r} in the checkpoint"
                              for i, name, theirs in renamed[:5])
            return None, f"class set differs: {shown}"
        return None, (f"class set differs: dataset ids {absent[:10]} are not among the checkpoint's "
                      f"{len(spec.source_ids)} classes")
    if value.shape == target.shape:
        return value, "loaded"
    return None, (f"class set differs: checkpoint has {_class_count(spec, value.shape[spec.dim])} classes, "
                  f"model {_class_count(spec, target.shape[spec.dim])}")


def import_layout_modules() -> None:
    """Import :data:`LAYOUT_MODULES` (they register their layouts and safe pickle globals)."""
    for module in LAYOUT_MODULES:
        importlib.import_module(module)


def detect_detector_layout(checkpoint: Mapping[str, Any]) -> DetectorLayout:
    """The first registered layout that recognises ``checkpoint``."""
    import_layout_modules()
    for layout in DETECTOR_LAYOUTS:
        if layout.matches(checkpoint):
            return layout
    keys = list(checkpoint.get("model", checkpoint))[:8] if isinstance(checkpoint, Mapping) else []
    raise CheckpointError(
        f"Not a detector checkpoint of a known layout ({[layout.name for layout in DETECTOR_LAYOUTS]}); "
        f"first keys: {keys}"
    )


def _backbone_differences(tensors: Mapping[str, Tensor], model: nn.Module) -> str:
    """``". Backbone differs: ..."`` when the checkpoint's FocalNet is another architecture than the model's."""
    from focalnet_pl.focalnet import FocalNet

    prefix = next((f"{name}." for name, module in model.named_modules() if isinstance(module, FocalNet)), None)
    if prefix is None:
        return ""
    theirs = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not theirs:
        return ""
    ours = {k[len(prefix):]: v for k, v in model.state_dict().items() if k.startswith(prefix)}
    differences = architecture_differences(focalnet_architecture(theirs), focalnet_architecture(ours))
    return f". Backbone differs: {'; '.join(differences)}" if differences else ""


def load_detector_weights(
    model: nn.Module,
    source: str | Path | Mapping[str, Any],
    *,
    class_ids: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    strict: bool = True,
    checkpoint_filter: Callable[[str], bool] | None = None,
) -> DetectorLoadReport:
    """Load a full detector checkpoint into a built detectron2 ``model``.

    Args:
        model: a detectron2 meta-architecture (DINO, GeneralizedRCNN, MaskFormer) as built by
            ``detectron2.modeling.build_model``.
        source: a path, an https URL, or the checkpoint's top-level dict already in memory.
        class_ids: dataset category id of each of the model's classes, in its contiguous order
            (``thing_dataset_id_to_contiguous_id`` inverted); selects class rows of checkpoints that
            record theirs (COCO's 91-row layout). Without it, class tensors load only when their class
            count equals the model's.
        class_names: the dataset's class names in the same order; where the checkpoint knows the names
            of its classes (COCO), a dataset that uses the same ids for other classes gets fresh class
            tensors instead of the rows of unrelated classes.
        strict: raise :class:`CheckpointError` when a tensor is missing, unused or of another shape.
        checkpoint_filter: only model keys for which this returns True are expected from and loaded
            from the file (e.g. everything but the backbone when that comes from ``MODEL.FOCALNET.WEIGHTS``);
            the file's tensors for the other keys (or for a part of that prefix the model does not
            have, such as a Swin backbone) are reported as ``skipped``.

    Returns:
        a :class:`DetectorLoadReport`, also logged.
    """
    name = str(source) if isinstance(source, (str, Path)) else "<checkpoint dict>"
    import_layout_modules()  # before reading: they declare the classes a checkpoint may pickle
    checkpoint = (
        read_detector_checkpoint(source) if isinstance(source, (str, Path)) else source
    )
    layout = detect_detector_layout(checkpoint)
    state = layout.convert(checkpoint, model)
    report = DetectorLoadReport(
        source=name, layout=layout.name, unexpected=list(state.unexpected), skipped=list(state.skipped)
    )
    target = model.state_dict()
    expected = [key for key in target if checkpoint_filter is None or checkpoint_filter(key)]
    loaded: StateDict = {}
    for key, value in state.tensors.items():
        if checkpoint_filter is not None and not checkpoint_filter(key):
            report.skipped.append(f"{key}: excluded by checkpoint_filter")
            continue
        if key not in target:
            report.unexpected.append(key)
            continue
        spec = state.class_rows.get(key)
        if spec is not None:
            fitted, how = _fit_class_rows(key, value, target[key], spec, class_ids, class_names)
            if fitted is None:
                report.reinitialised.append(f"{key}: {how}")
                continue
            converted = how == "selected" or key in state.converted
        elif value.shape != target[key].shape:
            report.wrong_shape.append(f"{key} (checkpoint {tuple(value.shape)} vs model {tuple(target[key].shape)})")
            continue
        else:
            fitted, converted = value, key in state.converted
        loaded[key] = fitted.to(dtype=target[key].dtype)
        (report.converted if converted else report.loaded).append(key)
    reinitialised = {entry.split(":", 1)[0] for entry in report.reinitialised}
    wrong = {entry.split(" ", 1)[0] for entry in report.wrong_shape}
    report.missing = [key for key in expected if key not in loaded and key not in reinitialised and key not in wrong]

    if strict and report.problems():
        raise CheckpointError(
            f"Checkpoint {name} ({layout.name} layout) does not fit the model: {report.problems()}"
            + _backbone_differences(state.tensors, model)
        )
    model.load_state_dict(loaded, strict=False)
    log.info("Loaded detector weights: %s", report.summary())
    if report.reinitialised:
        log.warning("Left at their initial values: %s", "; ".join(report.reinitialised))
    if report.skipped:
        log.warning("Not loaded on purpose: %s", "; ".join(report.skipped[:20])
                    + (f"; ... ({len(report.skipped) - 20} more)" if len(report.skipped) > 20 else ""))
    if report.problems():
        log.warning("Not loaded (strict=False): %s", report.problems())
    return report


class FocalNetPLLayout:
    """Our own files: Lightning checkpoints of the detection/segmentation tasks (``state_dict`` with
    ``model.`` names), ``cli.py export --part model`` files, and plain ``model.state_dict()`` dumps."""

    name = "focalnet-pl"

    @staticmethod
    def tensors(checkpoint: Mapping[str, Any]) -> StateDict:
        for key in ("state_dict", "model"):
            inner = checkpoint.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
                return {k: v for k, v in inner.items() if isinstance(v, Tensor)}
        return {k: v for k, v in checkpoint.items() if isinstance(v, Tensor)}

    def matches(self, checkpoint: Mapping[str, Any]) -> bool:
        return bool(self.tensors(checkpoint))

    def convert(self, checkpoint: Mapping[str, Any], model: nn.Module) -> ConvertedState:
        tensors = self.tensors(checkpoint)
        own = model.state_dict()
        if not any(key in own for key in tensors) and any(key.startswith("model.") for key in tensors):
            tensors = {key.removeprefix("model."): value for key, value in tensors.items()}
        # files saved before some layers were shared use their older names; those layers rename them
        for prefix, module in model.named_modules():
            if hasattr(module, "upgrade_state_dict"):
                module.upgrade_state_dict(tensors, f"{prefix}." if prefix else "")
        return ConvertedState(tensors=tensors)


register_detector_layout(FocalNetPLLayout(), first=False)

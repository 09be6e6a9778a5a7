"""One protocol for every evaluator (COCO AP, panoptic quality, mIoU) and the choice of evaluators for a
dataset and a model.

An evaluator is fed the model's input and output dicts batch by batch (``process``) and returns its
metrics, identical on every rank, at the end (``evaluate``); which evaluators run follows from the
dataset's ``evaluator_type`` and the outputs the model gives (:func:`build_evaluators`).
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from detectron2.data import Metadata

from focalnet_pl.evaluation.coco import COCO_METRIC_NAMES, COCOInstanceEvaluator, format_coco_table
from focalnet_pl.evaluation.panoptic import PanopticQualityEvaluator
from focalnet_pl.evaluation.semantic import SemanticSegmentationEvaluator

__all__ = [
    "OUTPUT_KINDS",
    "SUMMARY_METRICS",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "build_evaluators",
    "format_metrics_table",
    "summary_metrics",
]

#: what a detectron2 model's outputs can hold: ``instances`` (boxes, classes, scores), ``masks`` (the
#: instances carry ``pred_masks``), ``sem_seg`` (class scores per pixel), ``panoptic_seg`` (segments)
OUTPUT_KINDS = frozenset({"instances", "masks", "sem_seg", "panoptic_seg"})

#: the metrics a task logs and prints (the evaluators also return per-class and count entries)
SUMMARY_METRICS: tuple[str, ...] = (
    *COCO_METRIC_NAMES, *(f"segm_{name}" for name in COCO_METRIC_NAMES),
    "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "mIoU", "fwIoU", "pACC", "mACC",
)


class DatasetEvaluator(Protocol):
    """What every evaluator does (detectron2's ``DatasetEvaluator`` protocol)."""

    def reset(self) -> None:
        """Forget everything processed."""

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Take one batch: the model's input dicts and its output dicts."""

    def evaluate(self) -> dict[str, float]:
        """Gather what every rank processed (each image once) and return the metrics on every rank."""


class DatasetEvaluators:
    """Several evaluators as one: each processes every batch; their metrics are merged."""

    def __init__(self, evaluators: Sequence[DatasetEvaluator]) -> None:
        self.evaluators = list(evaluators)

    def reset(self) -> None:
        for evaluator in self.evaluators:
            evaluator.reset()

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        for evaluator in self.evaluators:
            evaluator.process(inputs, outputs)

    def evaluate(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for evaluator in self.evaluators:
            metrics.update(evaluator.evaluate())
        return metrics


def _contiguous_to_dataset(id_map: Mapping[int, int]) -> dict[int, int]:
    return {contiguous: dataset_id for dataset_id, contiguous in id_map.items()}


def build_evaluators(
    metadata: Metadata,
    outputs: Collection[str],
    instance_ground_truth: Callable[[], str | Mapping[str, Any]],
    output_dir: str | Path | None = None,
    file_prefix: str = "",
) -> DatasetEvaluators:
    """The evaluators of a dataset (``metadata.evaluator_type``) for a model giving ``outputs``
    (:data:`OUTPUT_KINDS`).

    * ``coco`` data: box AP (and mask AP for ``masks``) of the ``instances``, by pycocotools;
    * ``semantic`` / ``panoptic`` data: mIoU of ``sem_seg``; on ``panoptic`` data also PQ of
      ``panoptic_seg`` and the box-free mask AP of ``instances`` (as Mask2Former scores them).

    ``instance_ground_truth`` is called only when instances are scored; ``output_dir`` receives the COCO
    results files (``{file_prefix}coco_{iou_type}_results.json``).
    """
    kind = metadata.get("evaluator_type", None)
    evaluators: list[DatasetEvaluator] = []
    if kind == "coco" and "instances" in outputs:
        evaluators.append(COCOInstanceEvaluator(
            instance_ground_truth(), _contiguous_to_dataset(metadata.thing_dataset_id_to_contiguous_id),
            ("bbox", "segm") if "masks" in outputs else ("bbox",), output_dir, file_prefix,
        ))
    if kind in ("semantic", "panoptic") and "sem_seg" in outputs:
        names = list(metadata.stuff_classes)
        evaluators.append(SemanticSegmentationEvaluator(len(names), metadata.ignore_label, names))
    if kind == "panoptic" and "panoptic_seg" in outputs:
        evaluators.append(PanopticQualityEvaluator(range(len(metadata.stuff_classes)), metadata.thing_class_ids))
    if kind == "panoptic" and "instances" in outputs and evaluators:
        evaluators.append(COCOInstanceEvaluator(
            instance_ground_truth(), _contiguous_to_dataset(metadata.stuff_dataset_id_to_contiguous_id), ("segm",),
            output_dir, file_prefix,
        ))
    if not evaluators:
        wanted = {"coco": "instances", "semantic": "sem_seg (e.g. MODEL.MASK_FORMER.TEST.SEMANTIC_ON)",
                  "panoptic": "sem_seg or panoptic_seg (e.g. MODEL.MASK_FORMER.TEST.PANOPTIC_ON)"}
        raise ValueError(
            f"nothing to evaluate: the model gives {sorted(outputs)}, the data ({metadata.get('name', '?')}) has "
            f"evaluator_type {kind!r}" + (f", which needs {wanted[kind]}" if kind in wanted else
                                          f" (known: {sorted(wanted)})")
        )
    return DatasetEvaluators(evaluators)


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The :data:`SUMMARY_METRICS` among ``metrics``, in that order."""
    return {name: metrics[name] for name in SUMMARY_METRICS if name in metrics}


def format_metrics_table(metrics: Mapping[str, float], title: str) -> str:
    """The summary metrics as text: COCO AP as its table (box and mask rows), the others two-column."""
    summary = summary_metrics(metrics)
    lines = [title]
    if "AP" in summary or "segm_AP" in summary:
        lines.append(format_coco_table(summary))
    others = [(name, value) for name, value in summary.items()
              if name.removeprefix("segm_") not in COCO_METRIC_NAMES]
    width = max((len(name) for name, _ in others), default=0)
    lines.extend(f"  {name:<{width}}  {value:7.3f}" for name, value in others)
    return "\n".join(lines)

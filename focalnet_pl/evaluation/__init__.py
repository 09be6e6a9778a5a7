"""Evaluation independent of the models, one protocol for all (:class:`DatasetEvaluator`): COCO instances
(box/mask AP), panoptic quality, semantic segmentation (mIoU), each DDP-safe (every image counted once)."""

from focalnet_pl.evaluation.coco import (
    COCO_METRIC_NAMES,
    COCOInstanceEvaluator,
    coco_metrics,
    format_coco_table,
    instances_to_coco_results,
    load_coco_gt,
)
from focalnet_pl.evaluation.evaluator import (
    OUTPUT_KINDS,
    SUMMARY_METRICS,
    DatasetEvaluator,
    DatasetEvaluators,
    build_evaluators,
    format_metrics_table,
    summary_metrics,
)
from focalnet_pl.evaluation.gather import gather_unique_by_key
from focalnet_pl.evaluation.panoptic import PanopticQualityEvaluator
from focalnet_pl.evaluation.run import EvaluationData, EvaluationRun
from focalnet_pl.evaluation.semantic import SemanticSegmentationEvaluator

__all__ = [
    "COCO_METRIC_NAMES",
    "OUTPUT_KINDS",
    "SUMMARY_METRICS",
    "COCOInstanceEvaluator",
    "DatasetEvaluator",
    "DatasetEvaluators",
    "EvaluationData",
    "EvaluationRun",
    "PanopticQualityEvaluator",
    "SemanticSegmentationEvaluator",
    "build_evaluators",
    "coco_metrics",
    "format_coco_table",
    "format_metrics_table",
    "gather_unique_by_key",
    "instances_to_coco_results",
    "load_coco_gt",
    "summary_metrics",
]

"""Evaluation independent of the models: COCO instances (box/mask AP) and distributed gathering."""

from focalnet_pl.evaluation.coco import (
    COCO_METRIC_NAMES,
    COCOInstanceEvaluator,
    coco_metrics,
    format_coco_table,
    instances_to_coco_results,
    load_coco_gt,
)
from focalnet_pl.evaluation.gather import gather_unique_by_key

__all__ = [
    "COCO_METRIC_NAMES",
    "COCOInstanceEvaluator",
    "coco_metrics",
    "format_coco_table",
    "gather_unique_by_key",
    "instances_to_coco_results",
    "load_coco_gt",
]

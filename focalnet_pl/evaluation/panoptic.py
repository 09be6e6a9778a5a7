"""Panoptic quality (PQ, SQ, RQ), computed as panopticapi's ``pq_compute`` (Kirillov et al., 2019).

Per image, a predicted and a ground-truth segment match when they have the same category and
IoU > 0.5, the IoU leaving out the predicted pixels that fall on void (id 0) ground truth. As in
panopticapi: a ground-truth segment's area is the one its annotation records (``area`` in the json,
which ADE20K's panoptic conversion takes before things are pasted over stuff; pixels are counted
only when the annotation has no ``area``); every listed non-crowd ground-truth segment that is not
matched is a false negative, pixels or not; crowd segments are never matched nor false negatives,
and an unmatched prediction is not a false positive when more than half of it lies on void or on
the crowd region of its category (the last crowd segment of that category in annotation order).
Categories never seen (no TP, FP or FN over the dataset) are left out of the means.

Records are kept per image id, so DDP gathering counts each image once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Hashable, Iterable, Mapping, Sequence

import numpy as np
from torch import Tensor

from focalnet_pl.evaluation.gather import gather_unique_by_key

__all__ = ["PanopticQualityEvaluator", "panoptic_image_statistics", "panoptic_quality_from_statistics"]

VOID_ID = 0
_OFFSET = 1 << 32  # larger than any segment id, so gt_id * OFFSET + pred_id is a unique pair code


@dataclass
class CategoryStatistics:
    """Sums for one category: IoU of matched pairs, true positives, false positives, false negatives."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def add(self, other: CategoryStatistics) -> None:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn


def _segment_areas(id_map: np.ndarray) -> dict[int, int]:
    ids, counts = np.unique(id_map, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts)}


def _as_numpy_ids(id_map: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(id_map, Tensor):
        id_map = id_map.detach().cpu().numpy()
    return np.asarray(id_map).astype(np.int64)


def panoptic_image_statistics(
    pred_ids: Tensor | np.ndarray,
    pred_segments: Iterable[Mapping[str, Any]],
    gt_ids: Tensor | np.ndarray,
    gt_segments: Iterable[Mapping[str, Any]],
    image_name: str = "",
) -> dict[int, CategoryStatistics]:
    """Per-category TP/FP/FN/IoU sums for one image.

    ``pred_ids``/``gt_ids`` are (H, W) segment-id maps (0 = void / unlabelled); the segment lists hold
    dicts with ``id`` and ``category_id`` (ground truth also ``iscrowd`` and, as in panopticapi json,
    ``area``). Raises ``ValueError`` for a segment id in a map but not in its list, and for a listed
    predicted segment without pixels (panopticapi refuses both).
    """
    pred_ids, gt_ids = _as_numpy_ids(pred_ids), _as_numpy_ids(gt_ids)
    if pred_ids.shape != gt_ids.shape:
        raise ValueError(f"{image_name}: prediction is {pred_ids.shape}, ground truth is {gt_ids.shape}")
    pred_info = {int(s["id"]): s for s in pred_segments}
    gt_info = {int(s["id"]): s for s in gt_segments}
    pred_area = _segment_areas(pred_ids)
    gt_pixels = _segment_areas(gt_ids)
    for name, areas, info in (("prediction", pred_area, pred_info), ("ground truth", gt_pixels, gt_info)):
        unknown = sorted(set(areas) - set(info) - {VOID_ID})
        if unknown:
            raise ValueError(f"{image_name}: {name} segment ids {unknown[:10]} are in the id map but not listed")
    pred_area.pop(VOID_ID, None)
    empty = sorted(set(pred_info) - set(pred_area))
    if empty:
        raise ValueError(f"{image_name}: predicted segments {empty[:10]} are listed but have no pixels")
    gt_area = {gt_id: int(segment.get("area", gt_pixels.get(gt_id, 0))) for gt_id, segment in gt_info.items()}

    pair_ids, pair_counts = np.unique(gt_ids * _OFFSET + pred_ids, return_counts=True)
    intersections = {
        (int(code // _OFFSET), int(code % _OFFSET)): int(count) for code, count in zip(pair_ids, pair_counts)
    }

    stats: dict[int, CategoryStatistics] = {}

    def category(category_id: int) -> CategoryStatistics:
        return stats.setdefault(int(category_id), CategoryStatistics())

    matched_gt: set[int] = set()
    matched_pred: set[int] = set()
    for (gt_id, pred_id), intersection in intersections.items():
        if gt_id == VOID_ID or pred_id == VOID_ID:
            continue
        gt_segment, pred_segment = gt_info[gt_id], pred_info[pred_id]
        if gt_segment.get("iscrowd", 0) or gt_segment["category_id"] != pred_segment["category_id"]:
            continue
        pred_on_void = intersections.get((VOID_ID, pred_id), 0)
        union = pred_area[pred_id] + gt_area[gt_id] - intersection - pred_on_void
        iou = intersection / union
        if iou > 0.5:
            entry = category(gt_segment["category_id"])
            entry.tp += 1
            entry.iou += iou
            matched_gt.add(gt_id)
            matched_pred.add(pred_id)

    crowd_id_of_category: dict[int, int] = {}
    for gt_id, segment in gt_info.items():  # annotation order: the last crowd segment of a category wins
        if gt_id in matched_gt:
            continue
        if segment.get("iscrowd", 0):
            crowd_id_of_category[int(segment["category_id"])] = gt_id
        else:
            category(segment["category_id"]).fn += 1

    for pred_id, area in pred_area.items():
        if pred_id in matched_pred:
            continue
        category_id = int(pred_info[pred_id]["category_id"])
        ignored = intersections.get((VOID_ID, pred_id), 0)
        crowd_id = crowd_id_of_category.get(category_id)
        if crowd_id is not None:
            ignored += intersections.get((crowd_id, pred_id), 0)
        if ignored / area > 0.5:
            continue
        category(category_id).fp += 1
    return stats


def panoptic_quality_from_statistics(
    stats: Mapping[int, CategoryStatistics], thing_ids: set[int], category_ids: Iterable[int]
) -> dict[str, float]:
    """PQ/SQ/RQ (in %) over all, thing and stuff categories, plus the number of categories counted."""
    results: dict[str, float] = {}
    category_ids = list(category_ids)
    groups = {
        "": category_ids,
        "_th": [c for c in category_ids if c in thing_ids],
        "_st": [c for c in category_ids if c not in thing_ids],
    }
    for suffix, members in groups.items():
        pq = sq = rq = 0.0
        counted = 0
        for category_id in members:
            entry = stats.get(category_id)
            if entry is None or entry.tp + entry.fp + entry.fn == 0:
                continue
            counted += 1
            denominator = entry.tp + 0.5 * entry.fp + 0.5 * entry.fn
            pq += entry.iou / denominator
            sq += entry.iou / entry.tp if entry.tp else 0.0
            rq += entry.tp / denominator
        scale = 100.0 / counted if counted else 0.0
        results[f"PQ{suffix}"] = pq * scale
        results[f"SQ{suffix}"] = sq * scale
        results[f"RQ{suffix}"] = rq * scale
        results[f"num_categories{suffix}"] = float(counted)
    return results


class PanopticQualityEvaluator:
    """Accumulates per-image panoptic statistics and reduces them (DDP-safe) into PQ, SQ and RQ."""

    def __init__(self, category_ids: Iterable[int], thing_ids: Iterable[int]) -> None:
        self.category_ids = [int(c) for c in category_ids]
        self.thing_ids = {int(c) for c in thing_ids}
        unknown = self.thing_ids - set(self.category_ids)
        if unknown:
            raise ValueError(f"thing ids {sorted(unknown)} are not among the category ids")
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated image."""
        self._per_image: dict[Hashable, dict[int, CategoryStatistics]] = {}

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Add the model's ``panoptic_seg`` (segment map, segments) of each image against its
        ``pan_seg_gt`` and ``segments_info``."""
        for record, output in zip(inputs, outputs):
            segment_map, segments = output["panoptic_seg"]
            self.update(record["image_id"], segment_map, segments, record["pan_seg_gt"], record["segments_info"])

    def update(
        self,
        image_id: Hashable,
        pred_ids: Tensor | np.ndarray,
        pred_segments: Iterable[Mapping[str, Any]],
        gt_ids: Tensor | np.ndarray,
        gt_segments: Iterable[Mapping[str, Any]],
    ) -> None:
        """Add one image (see :func:`panoptic_image_statistics` for the argument format)."""
        self._per_image[image_id] = panoptic_image_statistics(
            pred_ids, pred_segments, gt_ids, gt_segments, image_name=str(image_id)
        )

    def evaluate(self) -> dict[str, float]:
        """PQ, SQ, RQ overall (``PQ``), things (``PQ_th``) and stuff (``PQ_st``), in percent."""
        totals: dict[int, CategoryStatistics] = {}
        for image_stats in gather_unique_by_key(self._per_image).values():
            for category_id, entry in image_stats.items():
                totals.setdefault(category_id, CategoryStatistics()).add(entry)
        return panoptic_quality_from_statistics(totals, self.thing_ids, self.category_ids)

    def __len__(self) -> int:
        return len(self._per_image)

"""COCO box / mask AP by pycocotools, independent of any model, correct under DDP.

Predictions are kept per image id, gathered from every rank and de-duplicated (the distributed
sampler repeats samples to even out ranks), written as COCO results json, and scored by
``pycocotools.cocoeval.COCOeval`` on exactly the images that were predicted.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch.distributed as dist
from detectron2.structures import Instances
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tabulate import tabulate

from focalnet_pl.evaluation.gather import gather_unique_by_key

__all__ = [
    "COCO_METRIC_NAMES",
    "COCOInstanceEvaluator",
    "box_only_as_ignore_regions",
    "coco_metrics",
    "format_coco_table",
    "instances_to_coco_results",
    "load_coco_gt",
]

log = logging.getLogger(__name__)

#: The first six ``COCOeval.stats`` entries, in order.
COCO_METRIC_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl")
#: Prefix of each IoU type's metric names: box AP is ``AP``, mask AP is ``segm_AP``.
METRIC_PREFIX: dict[str, str] = {"bbox": "", "segm": "segm_"}


def load_coco_gt(json_file: str | Path | Mapping) -> COCO:
    """pycocotools ``COCO`` index of a ground-truth json file or of its content as a dict (its progress
    prints are silenced)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if not isinstance(json_file, Mapping):
            return COCO(str(json_file))
        coco = COCO()
        coco.dataset = dict(json_file)
        coco.createIndex()
        return coco


def box_only_as_ignore_regions(coco_gt: COCO) -> COCO:
    """``coco_gt`` for mask AP: objects annotated with a box but no mask become crowd regions covering
    their box, which COCOeval ignores (detections on them are neither matches nor false positives,
    and they are not counted as missed). ``coco_gt`` itself when every object has a mask."""
    annotations = coco_gt.dataset.get("annotations", [])
    box_only = sum(1 for ann in annotations if not ann.get("segmentation"))
    if not box_only:
        return coco_gt
    log.info("mask AP: %d box-only ground-truth objects are ignore regions", box_only)
    masks_gt = COCO()
    masks_gt.dataset = {**coco_gt.dataset, "annotations": [
        ann if ann.get("segmentation") else {**ann, "segmentation": [_box_polygon(ann["bbox"])], "iscrowd": 1}
        for ann in annotations
    ]}
    with contextlib.redirect_stdout(io.StringIO()):
        masks_gt.createIndex()
    return masks_gt


def _box_polygon(bbox: Sequence[float]) -> list[float]:
    x, y, w, h = bbox
    return [x, y, x + w, y, x + w, y + h, x, y + h]


def instances_to_coco_results(
    instances: Instances, image_id: int | str, contiguous_to_dataset_id: Mapping[int, int] | None, with_masks: bool
) -> list[dict]:
    """COCO results entries (``bbox`` as xywh, ``score``, dataset ``category_id`` and, with masks,
    compressed-RLE ``segmentation``) for the predictions of one image."""
    instances = instances.to("cpu")
    if len(instances) == 0:
        return []
    boxes = instances.pred_boxes.tensor.float().numpy().copy()
    boxes[:, 2:] -= boxes[:, :2]
    scores = instances.scores.float().tolist()
    classes = instances.pred_classes.tolist()
    if contiguous_to_dataset_id is not None:
        classes = [contiguous_to_dataset_id[c] for c in classes]
    rles = None
    if with_masks:
        if not instances.has("pred_masks"):
            raise ValueError("mask evaluation requested but the model's Instances have no 'pred_masks'")
        masks = instances.pred_masks.numpy().astype(np.uint8)
        rles = [mask_utils.encode(np.asfortranarray(mask)) for mask in masks]
        for rle in rles:
            rle["counts"] = rle["counts"].decode("ascii")
    results = []
    for index in range(len(instances)):
        entry = {
            "image_id": image_id,
            "category_id": int(classes[index]),
            "bbox": [round(float(v), 3) for v in boxes[index]],
            "score": round(float(scores[index]), 5),
        }
        if rles is not None:
            entry["segmentation"] = rles[index]
        results.append(entry)
    return results


def coco_metrics(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: Iterable[int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75, APs, APm, APl (fractions; -1 where the ground truth has nothing to score)
    of COCO results ``results`` for ``iou_type`` ("bbox" or "segm") on ``image_ids`` (default: all)."""
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:
            coco_dt = COCO()
            coco_dt.dataset = {"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"], "annotations": []}
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(value) for name, value in zip(COCO_METRIC_NAMES, evaluator.stats[:6])}


def format_coco_table(metrics: Mapping[str, float], title: str = "") -> str:
    """One row per IoU type present in ``metrics`` (names as returned by :meth:`COCOInstanceEvaluator.evaluate`)."""
    rows = []
    for iou_type, prefix in METRIC_PREFIX.items():
        if f"{prefix}AP" in metrics:
            rows.append([iou_type] + [f"{metrics[prefix + name]:.4f}" for name in COCO_METRIC_NAMES])
    table = tabulate(rows, headers=["", *COCO_METRIC_NAMES], tablefmt="pipe", disable_numparse=True)
    return f"{title}\n{table}" if title else table


class COCOInstanceEvaluator:
    """Accumulates per-image predictions and scores them against a COCO instances json.

    Args:
        gt_json: ground-truth annotations in COCO instances format (a file, or its content as a dict).
        contiguous_to_dataset_id: model class index -> json ``category_id`` (``None``: identity).
        iou_types: "bbox" and/or "segm".
        output_dir: where rank 0 writes ``{file_prefix}coco_{iou_type}_results.json`` (the exact
            files scored by pycocotools); ``None``: nowhere.
    """

    def __init__(
        self,
        gt_json: str | Path | Mapping,
        contiguous_to_dataset_id: Mapping[int, int] | None = None,
        iou_types: Sequence[str] = ("bbox",),
        output_dir: str | Path | None = None,
        file_prefix: str = "",
    ) -> None:
        unknown = [t for t in iou_types if t not in METRIC_PREFIX]
        if unknown:
            raise ValueError(f"unsupported COCO IoU types {unknown}; use {list(METRIC_PREFIX)}")
        self.gt_json = gt_json if isinstance(gt_json, Mapping) else Path(gt_json)
        self.contiguous_to_dataset_id = dict(contiguous_to_dataset_id) if contiguous_to_dataset_id is not None else None
        self.iou_types = tuple(iou_types)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.file_prefix = file_prefix
        self._coco_gt: COCO | None = None
        self._predictions: dict[int | str, list[dict]] = {}

    @property
    def coco_gt(self) -> COCO:
        if self._coco_gt is None:
            self._coco_gt = load_coco_gt(self.gt_json)
        return self._coco_gt

    def reset(self) -> None:
        self._predictions = {}

    def process(self, inputs: Sequence[Mapping], outputs: Sequence[Mapping]) -> None:
        """Record the model ``outputs`` (dicts with ``instances``) for the dataset dicts ``inputs``."""
        for record, output in zip(inputs, outputs):
            if "image_id" not in record:
                raise KeyError("COCO evaluation needs an 'image_id' in every input dict")
            self._predictions[record["image_id"]] = instances_to_coco_results(
                output["instances"], record["image_id"], self.contiguous_to_dataset_id, "segm" in self.iou_types
            )

    def evaluate(self) -> dict[str, float]:
        """Gather predictions from all ranks, score them and return ``{AP.., segm_AP..}`` on every rank."""
        predictions = gather_unique_by_key(self._predictions)
        is_main = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
        metrics: dict[str, float] = {}
        if is_main:
            image_ids = sorted(predictions)
            unknown = sorted(set(image_ids) - set(self.coco_gt.getImgIds()))
            if unknown:
                source = "the given ground-truth dict" if isinstance(self.gt_json, Mapping) else self.gt_json
                raise KeyError(f"predicted image ids {unknown[:5]} are not in {source}")
            for iou_type in self.iou_types:
                results = [_for_iou_type(r, iou_type) for image_id in image_ids for r in predictions[image_id]]
                if self.output_dir is not None:
                    path = self.output_dir / f"{self.file_prefix}coco_{iou_type}_results.json"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_text(json.dumps(results))
                    log.info("wrote %d %s detections to %s", len(results), iou_type, path)
                coco_gt = box_only_as_ignore_regions(self.coco_gt) if iou_type == "segm" else self.coco_gt
                scores = coco_metrics(coco_gt, results, iou_type, image_ids)
                metrics.update({METRIC_PREFIX[iou_type] + name: value for name, value in scores.items()})
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            holder = [metrics]
            dist.broadcast_object_list(holder, src=0)
            metrics = holder[0]
        return metrics


def _for_iou_type(result: dict, iou_type: str) -> dict:
    """A results entry as scored for ``iou_type``: segm entries drop the box so that pycocotools
    computes areas from the mask (as COCO's own evaluation of mask submissions does)."""
    if iou_type == "segm":
        return {k: v for k, v in result.items() if k != "bbox"}
    return {k: v for k, v in result.items() if k != "segmentation"}

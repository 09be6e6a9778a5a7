"""COCO evaluation: numbers equal pycocotools on the written files; DDP padding is not counted twice."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from detectron2.structures import Boxes, Instances
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from test_coco_data import TINY_CATEGORIES, write_tiny_coco
from torch.utils.data import Dataset

from focalnet_pl.evaluation import COCOInstanceEvaluator, coco_metrics, format_coco_table, instances_to_coco_results

TO_DATASET_ID = {i: c["id"] for i, c in enumerate(TINY_CATEGORIES)}


def fake_predictions(gt: COCO, image_id: int) -> Instances:
    """Noisy copies of the ground truth plus a false positive, deterministic per image."""
    rng = np.random.default_rng(image_id)
    info = gt.imgs[image_id]
    height, width = info["height"], info["width"]
    to_contiguous = {v: k for k, v in TO_DATASET_ID.items()}
    boxes, scores, classes, masks = [], [], [], []
    for ann in gt.imgToAnns[image_id]:
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 2.0, 4)
        boxes.append([x + jitter[0], y + jitter[1], x + w + jitter[2], y + h + jitter[3]])
        scores.append(float(rng.uniform(0.3, 1.0)))
        classes.append(to_contiguous[ann["category_id"]] if rng.uniform() > 0.2 else 1 - to_contiguous[ann["category_id"]])
        mask = gt.annToMask(ann).astype(bool)
        masks.append(np.roll(mask, int(rng.integers(-2, 3)), axis=1))
    boxes.append([2.0, 2.0, 20.0, 18.0])
    scores.append(float(rng.uniform(0.1, 0.9)))
    classes.append(int(rng.integers(0, 2)))
    fp_mask = np.zeros((height, width), dtype=bool)
    fp_mask[2:18, 2:20] = True
    masks.append(fp_mask)
    instances = Instances((height, width))
    instances.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
    instances.scores = torch.tensor(scores)
    instances.pred_classes = torch.tensor(classes)
    instances.pred_masks = torch.from_numpy(np.stack(masks))
    return instances


def _direct_pycocotools(gt_json: Path, results_json: Path, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
        evaluator = COCOeval(gt, gt.loadRes(str(results_json)), iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return [float(v) for v in evaluator.stats[:6]]


def test_box_and_mask_ap_equal_pycocotools_on_the_written_files(tmp_path):
    gt_json = write_tiny_coco(tmp_path, "val2017", num_images=9, size=96)
    evaluator = COCOInstanceEvaluator(gt_json, TO_DATASET_ID, ("bbox", "segm"), output_dir=tmp_path / "logs",
                                      file_prefix="val_")
    gt = evaluator.coco_gt
    for image_id in gt.getImgIds():
        evaluator.process([{"image_id": image_id}], [{"instances": fake_predictions(gt, image_id)}])
    metrics = evaluator.evaluate()

    for iou_type, prefix in (("bbox", ""), ("segm", "segm_")):
        results_json = tmp_path / "logs" / f"val_coco_{iou_type}_results.json"
        results = json.loads(results_json.read_text())
        assert {r["category_id"] for r in results} <= {3, 7}  # mapped back to dataset ids
        assert ("segmentation" in results[0]) == (iou_type == "segm")
        direct = _direct_pycocotools(gt_json, results_json, iou_type)
        ours = [metrics[f"{prefix}{name}"] for name in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
        assert ours == direct
    assert 0.1 < metrics["AP"] < 0.95 and 0.1 < metrics["segm_AP"] < 0.95  # neither trivial nor perfect
    table = format_coco_table(metrics, title="COCO val:")
    assert "segm" in table and f"{metrics['AP']:.4f}" in table


def test_only_predicted_images_are_scored_and_empty_predictions_score_zero(tmp_path):
    gt_json = write_tiny_coco(tmp_path, "val2017", num_images=9, size=96)
    evaluator = COCOInstanceEvaluator(gt_json, TO_DATASET_ID, ("bbox",))
    gt = evaluator.coco_gt
    subset = gt.getImgIds()[:4]
    for image_id in subset:
        evaluator.process([{"image_id": image_id}], [{"instances": fake_predictions(gt, image_id)}])
    metrics = evaluator.evaluate()
    with contextlib.redirect_stdout(io.StringIO()):
        direct = COCOeval(gt, gt.loadRes(fake_results(gt, subset)), "bbox")
        direct.params.imgIds = subset
        direct.evaluate()
        direct.accumulate()
        direct.summarize()
    assert metrics["AP"] == float(direct.stats[0])
    empty = coco_metrics(gt, [], "bbox", gt.getImgIds())
    assert empty["AP"] == 0.0 and empty["AP50"] == 0.0
    with pytest.raises(KeyError, match="not in"):
        evaluator.reset()
        evaluator.process([{"image_id": 424242}], [{"instances": fake_predictions(gt, subset[0])}])
        evaluator.evaluate()


def fake_results(gt: COCO, image_ids: list[int]) -> list[dict]:
    """COCO results entries (boxes) of :func:`fake_predictions` for ``image_ids``."""
    return [r for i in image_ids for r in instances_to_coco_results(fake_predictions(gt, i), i, TO_DATASET_ID, False)]


# ---- DDP ---------------------------------------------------------------------------------------
class _ImageIds(Dataset):
    def __init__(self, image_ids: list[int]) -> None:
        self.image_ids = image_ids

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> dict:
        return {"image_id": self.image_ids[index]}


class _FakeDetector(L.LightningModule):
    """Validation-only module: deterministic predictions per image id, scored by the evaluator."""

    def __init__(self, gt_json: str) -> None:
        super().__init__()
        self.gt_json = gt_json
        self.evaluator = COCOInstanceEvaluator(gt_json, TO_DATASET_ID, ("bbox", "segm"))
        self.seen: list[int] = []

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        ids = self.evaluator.coco_gt.getImgIds()
        return torch.utils.data.DataLoader(_ImageIds(ids), batch_size=1, collate_fn=lambda b: b)

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        gt = self.evaluator.coco_gt
        self.seen.extend(item["image_id"] for item in batch)
        self.evaluator.process(batch, [{"instances": fake_predictions(gt, item["image_id"])} for item in batch])

    def on_validation_epoch_end(self) -> None:
        metrics = self.evaluator.evaluate()
        self.log_dict({f"val/{k}": v for k, v in metrics.items()})
        self.log("val/images_seen", float(len(self.seen)), reduce_fx="sum", sync_dist=True)


def _validate(gt_json: Path, devices: int) -> dict[str, float]:
    trainer_kwargs = dict(accelerator="cpu", devices=devices, logger=False, enable_progress_bar=False,
                          enable_model_summary=False, enable_checkpointing=False)
    if devices > 1:
        trainer_kwargs["strategy"] = "ddp_spawn"
    trainer = L.Trainer(**trainer_kwargs)
    return trainer.validate(_FakeDetector(str(gt_json)), verbose=False)[0]


def test_two_process_ddp_gives_the_same_ap_as_one_process(tmp_path):
    gt_json = write_tiny_coco(tmp_path, "val2017", num_images=5, size=96)  # 5 images: not divisible by 2
    single = _validate(gt_json, devices=1)
    double = _validate(gt_json, devices=2)
    assert double["val/images_seen"] == 6.0  # the sampler padded one image
    for name in ("AP", "AP50", "AP75", "segm_AP", "segm_AP50"):
        assert double[f"val/{name}"] == pytest.approx(single[f"val/{name}"], abs=1e-12)
    # counting the padded image twice would change the score: the de-duplication matters here
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_json))
    padded_ids = gt.getImgIds() + gt.getImgIds()[:1]
    duplicated = [r for i in padded_ids for r in fake_results(gt, [i])]
    assert coco_metrics(gt, duplicated, "bbox")["AP"] != pytest.approx(single["val/AP"])

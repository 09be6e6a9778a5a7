"""Mask2Former: point sampling, matching, losses, inference, a tiny model overfitting, every config."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.modeling import build_model

from datamodules.coco_panoptic import instances_from_panoptic, load_panoptic_json
from focalnet_pl.d2.config import build_detectron2_cfg
from focalnet_pl.evaluation.panoptic import PanopticQualityEvaluator
from focalnet_pl.mask2former import (
    HungarianMaskMatcher,
    MaskSetCriterion,
    panoptic_inference,
    point_sample,
    semantic_inference,
)
from helpers import scene_batch, tiny_mask2former, write_ade, write_ade_semantic, write_panoptic


REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- building blocks ------------------------------------------------------------------------------
def test_point_sample_reads_bilinear_values_at_normalised_coordinates() -> None:
    features = torch.arange(12.0).view(1, 1, 3, 4)  # value = 4 * row + col
    # pixel centres of (row 1, col 2) and (row 2, col 0), and the midpoint between cols 0 and 1 of row 0
    points = torch.tensor([[[2.5 / 4, 1.5 / 3], [0.5 / 4, 2.5 / 3], [1.0 / 4, 0.5 / 3]]])
    assert point_sample(features, points).flatten().tolist() == pytest.approx([6.0, 8.0, 0.5])


def _disjoint_masks(count: int, size: int = 32) -> torch.Tensor:
    masks = torch.zeros(count, size, size)
    for index in range(count):
        masks[index, :, index * size // count : (index + 1) * size // count] = 1
    return masks


def test_matcher_recovers_a_permutation_of_perfect_predictions() -> None:
    targets_masks = _disjoint_masks(3)
    labels = torch.tensor([2, 0, 1])
    order = torch.tensor([4, 0, 2])  # target t is predicted by query order[t]
    pred_masks = torch.full((1, 5, 32, 32), -10.0)
    pred_logits = torch.zeros(1, 5, 4)
    pred_logits[0, :, 3] = 5.0  # "no object" for unused queries
    for target, query in enumerate(order.tolist()):
        pred_masks[0, query] = targets_masks[target] * 20 - 10
        pred_logits[0, query] = -5.0
        pred_logits[0, query, labels[target]] = 5.0
    matcher = HungarianMaskMatcher(num_points=512)
    (query_index, target_index), = matcher(pred_logits, pred_masks, [{"labels": labels, "masks": targets_masks.bool()}])
    assert dict(zip(target_index.tolist(), query_index.tolist())) == {0: 4, 1: 0, 2: 2}


def test_criterion_is_lower_for_the_right_answer_and_supervises_every_layer() -> None:
    targets = [{"labels": torch.tensor([1, 0]), "masks": _disjoint_masks(2).bool()}]
    # uniform points (no importance sampling), so the right masks are not judged on their blurred boundary only
    criterion = MaskSetCriterion(num_classes=3, matcher=HungarianMaskMatcher(num_points=256), num_points=1024,
                                 oversample_ratio=1.0, importance_sample_ratio=0.0)
    good_masks = torch.full((1, 4, 32, 32), -8.0)
    good_masks[0, 0] = _disjoint_masks(2)[1] * 16 - 8
    good_masks[0, 1] = _disjoint_masks(2)[0] * 16 - 8
    good_logits = torch.full((1, 4, 4), -4.0)
    good_logits[0, 0, 0] = good_logits[0, 1, 1] = good_logits[0, 2, 3] = good_logits[0, 3, 3] = 4.0
    good = {"pred_logits": good_logits, "pred_masks": good_masks}
    bad = {"pred_logits": torch.zeros(1, 4, 4), "pred_masks": torch.zeros(1, 4, 32, 32)}
    outputs = {**good, "aux_outputs": [bad, copy.deepcopy(good)]}
    losses = criterion(outputs, targets)
    assert set(losses) == {f"{name}{suffix}" for name in ("loss_ce", "loss_mask", "loss_dice") for suffix in ("", "_0", "_1")}
    # weighted: class 2, mask 5, dice 5 (the defaults); zero mask logits: BCE = ln 2 on every point
    assert losses["loss_ce"] < 0.01 and losses["loss_ce_1"] < 0.01
    assert float(losses["loss_mask_0"]) == pytest.approx(5 * float(np.log(2)), rel=1e-5)
    for name in ("loss_mask", "loss_dice"):
        assert losses[f"{name}_0"] > 5 * losses[name]
        assert losses[f"{name}_1"] == pytest.approx(float(losses[name]), rel=0.5)
    # "no object" is down-weighted: with uniform logits CE = ln(4) for every query, weighted mean stays ln(4)
    assert float(losses["loss_ce_0"]) == pytest.approx(2 * float(np.log(4)), rel=1e-5)


def test_panoptic_inference_by_hand() -> None:
    # 3 classes (0 thing, 1 and 2 stuff) + no object; 4 queries over a 4x4 image
    logits = torch.full((4, 4), -10.0)
    logits[0, 0] = logits[1, 1] = logits[2, 1] = 10.0  # q0 thing, q1/q2 the same stuff class
    logits[3, 3] = 10.0  # q3 no object
    masks = torch.full((4, 4, 4), -10.0)
    masks[0, :2, :2] = 10.0  # thing, top-left
    masks[1, 2:, :] = 10.0  # stuff, bottom half
    masks[2, :2, 2:] = 10.0  # same stuff class, top-right: merged into q1's segment
    masks[3] = 10.0  # ignored (no object)
    segment_map, segments = panoptic_inference(logits, masks, thing_class_ids={0})
    assert segments == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 1}]
    expected = torch.tensor([[1, 1, 2, 2], [1, 1, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2]], dtype=torch.int32)
    assert torch.equal(segment_map, expected)
    # a query that wins less than overlap_threshold of its own mask is dropped: q1 now covers rows 1-3 with
    # higher mask probability, so q0 (rows 0-2, cols 0-2: 9 px) keeps only row 0 (3/9) and q2 (rows 0-1,
    # cols 2-3: 4 px) keeps only (0, 3) ((0, 2) is a tie, which the lower query index q0 wins): 1/4
    masks[0, :3, :3] = 10.0
    masks[1, 1:, :] = 12.0
    _, segments = panoptic_inference(logits, masks, thing_class_ids={0}, overlap_threshold=0.8)
    assert [s["category_id"] for s in segments] == [1]


def test_panoptic_inference_counts_every_pixel_a_query_wins() -> None:
    """The official rule: the area a query wins (inside its own mask or not) is compared with its own mask."""
    logits = torch.full((2, 3), -10.0)
    logits[0, 0] = logits[1, 1] = 10.0  # q0 thing, q1 stuff
    masks = torch.tensor([[[3.0, 3.0, 3.0, 3.0, -1.0, -1.0]],  # q0: own pixels 0-3 (4 px)
                          [[-9.0, -9.0, 10.0, 10.0, -5.0, -5.0]]])  # q1: own and wins pixels 2-3
    # q0 wins pixels 0, 1 (own) and 4, 5 (everyone's probability < 0.5 there, q0's highest): 4 / 4 >= 0.8;
    # inside its own mask it keeps only 2 of 4, which a rule counting those alone would drop
    segment_map, segments = panoptic_inference(logits, masks, thing_class_ids={0}, overlap_threshold=0.8)
    assert segments == [{"id": 1, "isthing": True, "category_id": 0}, {"id": 2, "isthing": False, "category_id": 1}]
    assert segment_map.tolist() == [[1, 1, 2, 2, 0, 0]]  # its segment: won pixels inside its own mask


def test_the_two_sine_position_embeddings() -> None:
    """Mask2Former's covers the whole map ((i + 1) / H); DINO's counts only the unpadded pixels."""
    from focalnet_pl.layers import DINOSinePositionEmbedding, MaskFormerSinePositionEmbedding

    features = torch.zeros(1, 3, 4, 6)
    mask_former = MaskFormerSinePositionEmbedding(4)(features)
    assert mask_former.shape == (1, 8, 4, 6) and mask_former.dtype == torch.float32
    # channel 0: sin of the y position (temperature ** 0 = 1); channel 1: cos of it
    expected_y = torch.arange(1, 5) / (4 + 1e-6) * 2 * torch.pi
    torch.testing.assert_close(mask_former[0, 0, :, 0], expected_y.sin())
    torch.testing.assert_close(mask_former[0, 1, :, 3], expected_y.cos())
    padding = torch.zeros(1, 4, 6, dtype=torch.bool)
    dino = DINOSinePositionEmbedding(4, temperature=10000.0)
    # unpadded: the same positions (temperatures equal); padded: DINO's stop at the image's last pixel
    torch.testing.assert_close(dino(padding), mask_former)
    padding[:, 2:] = True
    assert dino(padding)[0, 0, 1, 0] == pytest.approx(float(torch.sin(torch.tensor(2 / (2 + 1e-6) * 2 * torch.pi))), abs=1e-6)


def test_semantic_inference_sums_class_probability_times_mask() -> None:
    logits = torch.tensor([[5.0, -5.0, -5.0], [-5.0, 5.0, -5.0]])
    masks = torch.stack([torch.tensor([[10.0, -10.0]]), torch.tensor([[-10.0, 10.0]])])
    scores = semantic_inference(logits, masks)
    assert scores.shape == (2, 1, 2)
    assert scores.argmax(0).tolist() == [[0, 1]]


def test_tiny_model_overfits_two_scenes() -> None:
    torch.manual_seed(0)
    model = build_model(build_detectron2_cfg(tiny_mask2former(3, [0])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    batch = scene_batch()
    history = []
    for _ in range(50):
        losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append(float(total))
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])
    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    evaluator = PanopticQualityEvaluator(category_ids=[0, 1, 2], thing_ids=[0])
    for record, output in zip(batch, outputs):
        segment_map, segments = output["panoptic_seg"]
        evaluator.update(record["image_id"], segment_map, segments, record["pan_seg_gt"], record["segments_info"])
        assert output["sem_seg"].shape == (3, 64, 64)
        assert output["instances"].pred_masks.shape[1:] == (64, 64)
    result = evaluator.evaluate()
    assert result["PQ"] > 60, result  # every segment found with IoU > 0.5


def test_bf16_autocast_training_step_runs() -> None:
    model = build_model(build_detectron2_cfg(tiny_mask2former(3, [0])))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(scene_batch()[:1])
    total = sum(losses.values())
    total.backward()
    assert torch.isfinite(total)


# ---- every shipped config, a few steps with tiny overrides ----------------------------------------------
CONFIGS = [
    "mask2former_focalnet_l_ade20k_semantic.yaml",
    "mask2former_focalnet_l_ade20k_panoptic.yaml",
    "mask2former_focalnet_l_coco_panoptic.yaml",
    "mask2former_focalnet_t_ade20k_semantic.yaml",
    "mask2former_focalnet_t_ade20k_panoptic.yaml",
    "mask2former_focalnet_t_coco_panoptic.yaml",
    "demo/mask2former_shapes.yaml",
]


def _panoptic_tree(root: Path, layout: str, shapes: Sequence[tuple[int, int]] = ((40, 40), (40, 40))) -> None:
    """panopticapi files for both splits (images of ``shapes``), in the COCO or the ADE20K folder layout."""
    for split in ("train", "val"):
        json_file, images, pngs = write_panoptic(root / f"tmp_{split}", shapes=shapes)
        if layout == "coco":
            (root / "annotations").mkdir(parents=True, exist_ok=True)
            images.rename(root / f"{split}2017")
            pngs.rename(root / f"panoptic_{split}2017")
            json_file.rename(root / "annotations" / f"panoptic_{split}2017.json")
            records, classes = load_panoptic_json(root / "annotations" / f"panoptic_{split}2017.json",
                                                  root / f"{split}2017", root / f"panoptic_{split}2017")
            instances = root / "annotations" / f"instances_{split}2017.json"
            instances.write_text(json.dumps(instances_from_panoptic(records, classes)))
        else:
            base = root / "ADEChallengeData2016"
            folder = "training" if split == "train" else "validation"
            (base / "images").mkdir(parents=True, exist_ok=True)
            images.rename(base / "images" / folder)
            pngs.rename(base / f"ade20k_panoptic_{split}")
            json_file.rename(base / f"ade20k_panoptic_{split}.json")
            write_ade_semantic(base, folder, "detectron2")


@pytest.mark.slow
@pytest.mark.parametrize("config_name", CONFIGS)
def test_config_trains_and_evaluates_a_few_steps(config_name: str, tmp_path: Path) -> None:
    from focalnet_pl.cli import FocalNetCLI

    config = yaml.safe_load((REPO / "configs" / config_name).read_text())
    model_args = config["model"]["init_args"]
    detectron2 = model_args["detectron2"]
    tiny = tiny_mask2former(0, [])["MODEL"]
    for key in ("FOCALNET", "SEM_SEG_HEAD", "MASK_FORMER"):
        tiny[key].pop("NUM_CLASSES", None)
        tiny[key].pop("THING_CLASS_IDS", None)
        tiny[key].pop("TEST", None)
        detectron2["MODEL"].setdefault(key, {}).update(tiny[key])
    detectron2["MODEL"]["FOCALNET"]["WEIGHTS"] = ""
    detectron2["MODEL"]["SEM_SEG_HEAD"].pop("NUM_CLASSES", None)  # from the datamodule
    data_args = config["data"]["init_args"]
    data_class = config["data"]["class_path"]
    if data_class.endswith("ADE20KSemanticDataModule"):
        write_ade(tmp_path, size=(40, 56))
        data_args.update(root=str(tmp_path), class_names=["a", "b", "c"])
    elif data_class.endswith("ADE20KPanopticDataModule"):
        _panoptic_tree(tmp_path, "ade")
        data_args.update(root=str(tmp_path))
    else:
        _panoptic_tree(tmp_path, "coco")
        data_args.update(root=str(tmp_path), demo=False)
    data_args.update(crop_size=32, test_size=40, test_max_size=64, batch_size=2, eval_batch_size=2, num_workers=0)
    model_args["predict_output_dir"] = str(tmp_path / "predictions")
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 1,
                         "num_sanity_val_steps": 0, "enable_progress_bar": False, "enable_model_summary": False,
                         "default_root_dir": str(tmp_path), "precision": "32-true",
                         "callbacks": config["trainer"].get("callbacks", []),  # the config's ModelCheckpoint runs
                         "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                    "init_args": {"save_dir": str(tmp_path)}}}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cli = FocalNetCLI(args=["--config", str(config_file)], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    configured = [cb["init_args"] for cb in config["trainer"]["callbacks"] if cb["class_path"].endswith("ModelCheckpoint")]
    monitor = configured[0]["monitor"] if configured else cli.model.monitor_metric
    assert monitor == ("val/PQ" if "panoptic" in config_name or "shapes" in config_name else "val/mIoU")
    assert [cb.monitor for cb in cli.trainer.checkpoint_callbacks] == [monitor]
    best = cli.trainer.checkpoint_callback
    assert float(best.best_model_score) == pytest.approx(float(cli.trainer.callback_metrics[monitor]))
    name = Path(best.best_model_path).name  # the config's file name pattern (step...), else the task's (epoch...)
    assert Path(best.best_model_path).is_file() and name.startswith("step" if configured else "epoch")
    metrics = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    panoptic = cli.datamodule.metadata.evaluator_type == "panoptic"
    assert ("test/PQ" in metrics) == panoptic and ("test/PQ_th" in metrics) == panoptic and "test/mIoU" in metrics
    # box-free mask AP of the instance outputs (INSTANCE_ON), against COCO's instances json when there is one
    instance_on = cli.model.model.instance_on and panoptic
    assert ("test/segm_AP" in metrics) == instance_on and "test/AP" not in metrics
    if instance_on and data_class.endswith("COCOPanopticDataModule"):
        assert cli.datamodule.instance_ground_truth() == str(tmp_path / "annotations" / "instances_val2017.json")
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule)
    assert len(predictions) >= 1
    assert len(list((tmp_path / "predictions").glob("*.png"))) == 2


def test_poly_and_step_schedules() -> None:
    from focalnet_pl.tasks.segmentation import SegmentationTask

    overrides = tiny_mask2former(3, [0])
    poly = SegmentationTask(detectron2=overrides, lr_schedule="poly", max_steps=100, warmup_iters=10, warmup_factor=0.1)
    assert poly.lr_factor(0, 0) == pytest.approx(0.1)
    assert poly.lr_factor(50, 0) == pytest.approx(0.5**0.9)
    assert poly.lr_factor(100, 0) == 0.0
    step = SegmentationTask(detectron2=overrides, lr_schedule="step", lr_decay_epochs=[44, 48])
    assert [step.lr_factor(0, epoch) for epoch in (43, 44, 48)] == pytest.approx([1.0, 0.1, 0.01])
    with pytest.raises(ValueError, match="trains Mask2Former"):
        SegmentationTask(detectron2={"MODEL": {"META_ARCHITECTURE": "GeneralizedRCNN"}})


def test_segmentation_task_takes_every_detection_task_argument() -> None:
    """LightningCLI records a task's own signature as its hyper-parameters: SegmentationTask must name all
    of DetectionTask's for its checkpoints to restore the same task."""
    import inspect

    from focalnet_pl.tasks.detection import DetectionTask
    from focalnet_pl.tasks.segmentation import SegmentationTask

    assert set(inspect.signature(SegmentationTask).parameters) == set(inspect.signature(DetectionTask).parameters)

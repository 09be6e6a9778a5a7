"""Mask R-CNN through DetectionTask: every config runs, a tiny model overfits, checkpoints, predict."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from detectron2.data.detection_utils import read_image
from test_coco_data import write_tiny_coco, write_tiny_coco_layout

from datamodules.coco import COCODataModule
from focalnet_pl.cli import FocalNetCLI
from focalnet_pl.tasks.detection import DetectionTask

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MASK_RCNN_CONFIGS = sorted(CONFIGS.glob("mask_rcnn_focalnet_*.yaml"))

#: microsoft/FocalNet detection/configs/focalnet/mask_rcnn_focalnet_*: drop path per (size, rf, schedule)
OFFICIAL_DROP_PATH = {
    ("t", "1x"): 0.1, ("t", "3x"): 0.3, ("s", "1x"): 0.2, ("s", "3x"): 0.5, ("b", "1x"): 0.3, ("b", "3x"): 0.5,
}
SIZE_NAMES = {"t": "tiny", "s": "small", "b": "base"}

#: Small-model overrides: narrow widths, one block per stage, few proposals.
TINY_MODEL = {
    "MODEL": {
        # tiny widths: no pretrained backbone (the demo config names the classification demo's export)
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0, "WEIGHTS": ""},
        "FPN": {"OUT_CHANNELS": 32},
        "ANCHOR_GENERATOR": {"SIZES": [[16], [32], [64], [128], [256]]},
        "RPN": {"BATCH_SIZE_PER_IMAGE": 64, "PRE_NMS_TOPK_TRAIN": 200, "PRE_NMS_TOPK_TEST": 100,
                "POST_NMS_TOPK_TRAIN": 100, "POST_NMS_TOPK_TEST": 50},
        "ROI_HEADS": {"BATCH_SIZE_PER_IMAGE": 64},
        "ROI_BOX_HEAD": {"FC_DIM": 64},
        "ROI_MASK_HEAD": {"NUM_CONV": 1, "CONV_DIM": 16},
    },
    "TEST": {"DETECTIONS_PER_IMAGE": 10},
}
SMALL_IMAGES = {"train_min_sizes": [64], "train_max_size": 96, "crop_resize_sizes": [48, 64], "crop_size": [32, 48],
                "test_min_size": 64, "test_max_size": 96, "batch_size": 2, "eval_batch_size": 2, "num_workers": 0}


pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops


def deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_detectron2(mask_on: bool = True) -> dict:
    """A complete small Mask R-CNN config (the recipe of the YAML files with TINY_MODEL applied)."""
    recipe = yaml.safe_load((CONFIGS / "mask_rcnn_focalnet_t_srf_1x.yaml").read_text())
    detectron2 = deep_update(recipe["model"]["init_args"]["detectron2"], TINY_MODEL)
    detectron2["MODEL"]["MASK_ON"] = mask_on
    return detectron2


def small_config(config: Path, tmp_path: Path, data_root: Path) -> Path:
    """``config`` with a tiny model, small images, CPU trainer, 1 training step and 2 val batches."""
    recipe = yaml.safe_load(config.read_text())
    recipe["model"]["init_args"]["detectron2"] = deep_update(recipe["model"]["init_args"]["detectron2"], TINY_MODEL)
    data_args = recipe["data"]["init_args"]
    data_args.pop("demo", None)
    data_args.update(SMALL_IMAGES, root=str(data_root))
    recipe["trainer"].update(
        accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_epochs=1, limit_train_batches=1,
        limit_val_batches=2, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path / "logs"), check_val_every_n_epoch=1,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "logs")}},
    )
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_configs_mirror_the_official_recipe():
    assert len(MASK_RCNN_CONFIGS) == 12
    for config in MASK_RCNN_CONFIGS:
        _, _, _, size, rf, schedule = config.stem.split("_")
        recipe = yaml.safe_load(config.read_text())
        args = recipe["model"]["init_args"]
        model = args["detectron2"]["MODEL"]
        assert model["FOCALNET"]["VARIANT"] == f"focalnet_{SIZE_NAMES[size]}_{rf}"
        assert model["FOCALNET"]["DROP_PATH_RATE"] == OFFICIAL_DROP_PATH[(size, schedule)], config.name
        assert model["FOCALNET"]["FOCAL_WINDOWS"] == [9, 9, 9, 9] and model["MASK_ON"] is True
        assert (args["lr"], args["weight_decay"]) == (1e-4, 0.05)
        epochs, decays = {"1x": (12, [9, 11]), "3x": (36, [27, 33])}[schedule]
        assert recipe["trainer"]["max_epochs"] == epochs and args["lr_decay_epochs"] == decays
        data = recipe["data"]["init_args"]
        assert data["train_min_sizes"] == list(range(480, 801, 32)) and data["train_max_size"] == 1333
        assert data["batch_size"] * recipe["trainer"]["devices"] == 16


@pytest.mark.parametrize("config", MASK_RCNN_CONFIGS + [CONFIGS / "demo" / "mask_rcnn_shapes.yaml"], ids=lambda p: p.stem)
def test_every_mask_rcnn_config_trains_a_step_and_validates(config, tmp_path):
    data_root = write_tiny_coco_layout(tmp_path / "coco", num_train=2, num_val=2)
    cli = FocalNetCLI(args=["--config", str(small_config(config, tmp_path, data_root))], run=False)
    assert isinstance(cli.model, DetectionTask) and isinstance(cli.datamodule, COCODataModule)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.model.num_classes == 2  # taken from the datamodule
    metrics = cli.trainer.callback_metrics
    assert {"train/loss", "train/loss_mask", "train/loss_rpn_cls", "val/AP", "val/segm_AP"} <= set(metrics)
    assert len(list((tmp_path / "logs").rglob("val_coco_segm_results.json"))) == 1
    # the config's ModelCheckpoint is the one that ran (the 12 recipes keep the best mask AP), else the task's
    configured = [cb["init_args"]["monitor"] for cb in yaml.safe_load(config.read_text())["trainer"].get("callbacks", [])
                  if cb["class_path"].endswith("ModelCheckpoint")]
    monitor = configured[0] if configured else "val/AP"
    assert config.parent.name == "demo" or monitor == "val/segm_AP"
    assert [cb.monitor for cb in cli.trainer.checkpoint_callbacks] == [monitor]
    best = cli.trainer.checkpoint_callback
    assert float(best.best_model_score) == pytest.approx(float(metrics[monitor]))
    assert Path(best.best_model_path).is_file() and monitor.split("/")[1] in Path(best.best_model_path).name


def _tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return L.Trainer(**options)


def _overfit_datamodule(tmp_path: Path, **kwargs) -> COCODataModule:
    json_file = write_tiny_coco(tmp_path / "data", "train2017", num_images=3, size=64, with_crowd=False)
    images = str(tmp_path / "data" / "train2017")
    return COCODataModule(train_json=str(json_file), train_images=images, val_json=str(json_file), val_images=images,
                          **{**SMALL_IMAGES, "batch_size": 2, "eval_batch_size": 3, "augmentation": "none", **kwargs})


class _LossHistory(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_tiny_mask_rcnn_overfits_and_predicts(tmp_path):
    L.seed_everything(0)
    datamodule = _overfit_datamodule(tmp_path)
    task = DetectionTask(detectron2=tiny_detectron2(), lr=4e-3, weight_decay=0.0, warmup_iters=5,
                         predict_output_dir=str(tmp_path / "predictions"), score_threshold=0.3)
    history = _LossHistory()
    trainer = _tiny_trainer(tmp_path, max_steps=60, limit_val_batches=0, callbacks=[history])
    trainer.fit(task, datamodule)
    first, last = sum(history.losses[:5]) / 5, sum(history.losses[-5:]) / 5
    assert last < 0.4 * first, (first, last)

    metrics = _tiny_trainer(tmp_path).validate(task, datamodule, verbose=False)[0]
    assert metrics["val/AP50"] >= 0.5 and metrics["val/segm_AP50"] >= 0.5, metrics
    results = json.loads((tmp_path / "val_coco_segm_results.json").read_text())
    assert {r["category_id"] for r in results} <= {3, 7} and all("counts" in r["segmentation"] for r in results)

    # what SamplePredictionLogger sends to TensorBoard after each validation
    batch = next(iter(datamodule.val_dataloader()))
    samples = task.eval().visualize_batch(batch, max_images=2)
    assert [tag for tag, _ in samples] == ["val_samples/000010", "val_samples/000015"]
    raws = [read_image(record["file_name"], format="RGB") for record in batch[:2]]
    assert all(picture.shape == raw.shape for (_, picture), raw in zip(samples, raws))
    assert any((picture != raw).any() for (_, picture), raw in zip(samples, raws))  # detections drawn

    _tiny_trainer(tmp_path).predict(task, datamodule, return_predictions=False)
    out = tmp_path / "predictions"
    drawn = sorted(p.name for p in out.glob("*.png"))
    assert drawn == ["000010.png", "000015.png", "000020.png"]
    predictions = json.loads((out / "coco_results.json").read_text())
    assert {15, 20} <= {r["image_id"] for r in predictions} and {r["category_id"] for r in predictions} <= {3, 7}
    images = json.loads((out / "images.json").read_text())
    assert [i["id"] for i in images["images"]] == [10, 15, 20]
    assert images["categories"] == [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]


def test_checkpoint_round_trip_and_mismatches(tmp_path):
    datamodule = _overfit_datamodule(tmp_path)
    task = DetectionTask(detectron2=tiny_detectron2(), lr=1e-3)
    trainer = _tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(task, datamodule)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    restored = DetectionTask.load_from_checkpoint(path, weights_only=True)  # classes come from the checkpoint
    assert restored.num_classes == 2
    for name, value in task.state_dict().items():
        assert torch.equal(value, restored.state_dict()[name]), name

    # predict on a plain folder: classes, names and dataset ids come from the checkpoint
    folder_data = COCODataModule(predict_images=str(tmp_path / "data" / "train2017"), **SMALL_IMAGES)
    fresh = DetectionTask(detectron2=tiny_detectron2(), predict_output_dir=str(tmp_path / "folder_predictions"))
    _tiny_trainer(tmp_path).predict(fresh, folder_data, ckpt_path=path, return_predictions=False)
    images = json.loads((tmp_path / "folder_predictions" / "images.json").read_text())
    assert images["categories"] == [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]
    assert len(list((tmp_path / "folder_predictions").glob("*.png"))) == 3

    with pytest.raises(ValueError, match="3 classes but this one predicts 2|predicts 2 classes but"):
        checkpoint = torch.load(path, weights_only=True)
        checkpoint["detection"]["num_classes"] = 3
        DetectionTask(detectron2=deep_update(tiny_detectron2(), {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}})).on_load_checkpoint(checkpoint)
    box_only = DetectionTask(detectron2=deep_update(tiny_detectron2(mask_on=False), {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}}))
    with pytest.raises(ValueError, match=r"another architecture than this config builds: mask_on: checkpoint True, config False"):
        box_only.on_load_checkpoint(torch.load(path, weights_only=True))
    unrecorded = torch.load(path, weights_only=True)
    del unrecorded["focalnet_pl_architecture"]  # checkpoints written before the record: the keys still tell
    with pytest.raises(ValueError, match=r"another head.*unexpected keys \['model.roi_heads.mask_head"):
        box_only.on_load_checkpoint(unrecorded)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["detection"]["meta_architecture"] = "DINO"
    with pytest.raises(ValueError, match="holds a DINO model"):
        DetectionTask(detectron2=tiny_detectron2()).on_load_checkpoint(checkpoint)


def test_number_of_classes_mismatch_and_image_format_mismatch_are_errors(tmp_path):
    datamodule = _overfit_datamodule(tmp_path)
    explicit = DetectionTask(detectron2=deep_update(tiny_detectron2(), {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 5}}}))
    assert explicit.num_classes == 5  # built right away: the config sets it
    with pytest.raises(ValueError, match="NUM_CLASSES=5 but the datamodule has 2 classes"):
        _tiny_trainer(tmp_path).validate(explicit, datamodule, verbose=False)
    with pytest.raises(ValueError, match="gives BGR images but detectron2.INPUT.FORMAT is 'RGB'"):
        _tiny_trainer(tmp_path).validate(DetectionTask(detectron2=tiny_detectron2()), _overfit_datamodule(tmp_path, image_format="BGR"))
    unknown = DetectionTask(detectron2=tiny_detectron2())
    unknown.setup("predict")  # no datamodule: the model waits for a checkpoint
    with pytest.raises(RuntimeError, match="number of classes unknown"):
        unknown.configure_optimizers()
    with pytest.raises(ValueError, match="NUM_CLASSES_KEYS"):
        DetectionTask(detectron2={"MODEL": {"META_ARCHITECTURE": "SemanticSegmentor"}})


def test_optimizer_groups_and_learning_rate_schedule(tmp_path):
    task = DetectionTask(detectron2=deep_update(tiny_detectron2(), {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}}),
                         lr=1e-3, backbone_lr=1e-4, weight_decay=0.05, lr_decay_epochs=[2, 4], lr_decay_factor=0.1,
                         warmup_iters=10, warmup_factor=0.01)
    groups = task.parameter_groups()
    names = {n: g for g in groups for n in g["param_names"]}
    backbone_weight = "backbone.bottom_up.body.layers.0.blocks.0.modulation.f.weight"
    assert names[backbone_weight]["lr"] == pytest.approx(1e-4) and names[backbone_weight]["weight_decay"] == 0.05
    assert names["backbone.bottom_up.body.layers.0.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert names["roi_heads.box_head.fc1.bias"]["weight_decay"] == 0.0
    assert names["roi_heads.box_head.fc1.weight"]["lr"] == pytest.approx(1e-3)
    assert names["roi_heads.box_head.fc1.weight"]["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in task.parameters() if p.requires_grad)
    assert task.lr_factor(0, 0) == pytest.approx(0.01)
    assert task.lr_factor(5, 0) == pytest.approx(0.505)
    assert task.lr_factor(10, 1) == 1.0
    assert task.lr_factor(100, 2) == pytest.approx(0.1)
    assert task.lr_factor(100, 4) == pytest.approx(0.01)


def test_bf16_mixed_precision_steps_are_finite(tmp_path):
    datamodule = _overfit_datamodule(tmp_path)
    task = DetectionTask(detectron2=tiny_detectron2(), lr=1e-3)
    history = _LossHistory()
    _tiny_trainer(tmp_path, precision="bf16-mixed", max_steps=2, limit_val_batches=0, callbacks=[history]).fit(task, datamodule)
    assert len(history.losses) == 2 and all(torch.isfinite(torch.tensor(history.losses)))

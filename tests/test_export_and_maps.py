"""safetensors export (cli.py export), modulation maps (cli.py modulation-maps), predict pictures, TensorBoard samples."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import save_task_checkpoint
from focalnet_pl import create_focalnet
from focalnet_pl.cli import main as cli_main
from focalnet_pl.export import (
    focalnet_from_export,
    load_task,
    read_export_info,
)
from focalnet_pl.tasks import ClassificationTask
from focalnet_pl.tasks.callbacks import SamplePredictionLogger
from focalnet_pl.visualize.modulation import modulation_maps
from focalnet_pl.weights import CheckpointError, read_safetensors_metadata

TINY = {"embed_dim": 8, "depths": [1, 1, 2, 1], "focal_levels": [2, 2, 3, 2]}


def _images(folder: Path, count: int = 2, size: int = 48) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
        pixels[10:30, 12:32] = (250, 20, 20)
        Image.fromarray(pixels).save(folder / f"img{i}.png")
    return folder


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, Path, ClassificationTask]:
    """A config and a Lightning checkpoint of a tiny 4-class classifier (weights perturbed from init)."""
    task = ClassificationTask(variant="focalnet_tiny_srf", num_classes=4, model_overrides=TINY,
                              class_names=["a", "b", "c", "d"])
    with torch.no_grad():
        for p in task.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask",
                  "init_args": {"variant": "focalnet_tiny_srf", "model_overrides": TINY}},
        "data": {"class_path": "datamodules.ImageNetDataModule", "init_args": {"root": "unused", "image_size": 64}},
    }))
    return config, save_task_checkpoint(task, tmp_path / "last.ckpt"), task


@pytest.mark.slow
def test_export_backbone_via_cli_reads_back(trained, tmp_path: Path) -> None:
    config, ckpt, task = trained
    output = tmp_path / "exports" / "backbone.safetensors"
    cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output)])
    info = read_export_info(output)
    assert info["part"] == "backbone" and info["num_classes"] == 4
    assert info["focalnet_config"]["focal_levels"] == [2, 2, 3, 2]
    assert info["hyper_parameters"]["class_names"] == ["a", "b", "c", "d"]
    sidecar = yaml.safe_load(output.with_suffix(".yaml").read_text())
    assert sidecar["focalnet_config"]["embed_dim"] == 8 and sidecar["config"]["model"]["init_args"]["variant"]

    image = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = task.model.eval()(image)
        by_name = create_focalnet("focalnet_tiny_srf", num_classes=4, weights=str(output), **TINY).eval()
        torch.testing.assert_close(by_name(image), expected, rtol=0, atol=0)
        rebuilt = focalnet_from_export(output).eval()
        torch.testing.assert_close(rebuilt(image), expected, rtol=0, atol=0)
        dense = focalnet_from_export(output, features_only=True).eval()
        assert [f.shape[1] for f in dense(image)] == [8, 16, 32, 64]
    with pytest.raises(CheckpointError, match="does not match the model"):  # another architecture
        create_focalnet("focalnet_tiny_srf", num_classes=4, weights=str(output), embed_dim=8, depths=[1, 1, 1, 1])


@pytest.mark.slow
def test_export_full_model(trained, tmp_path: Path) -> None:
    config, ckpt, task = trained
    output = tmp_path / "model.safetensors"
    cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output), "--part", "model"])
    from safetensors.torch import load_file

    state = load_file(str(output))
    assert set(state) == set(task.state_dict())
    fresh = ClassificationTask(**json.loads(read_safetensors_metadata(output)["hyper_parameters"]))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.model.head.weight, task.model.head.weight)
    with pytest.raises(CheckpointError, match="holds a full task model"):
        focalnet_from_export(output)


def test_export_refuses_code_running_checkpoint(trained, tmp_path: Path) -> None:
    config, _, task = trained

    class Payload:
        def __reduce__(self):
            return (print, ("this would have run",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": {}, "x": Payload()}, evil)
    from focalnet_pl.export import read_config

    with pytest.raises(CheckpointError, match="Refused to load"):
        load_task(read_config(config), evil)


def test_modulation_maps_values_match_the_modules() -> None:
    model = create_focalnet("focalnet_tiny_srf", num_classes=0, **TINY).eval()
    image = torch.randn(1, 3, 64, 72)
    maps = modulation_maps(model, image)
    assert [m.stage for m in maps] == [0, 1, 2, 3]
    assert [m.focal_level for m in maps] == [2, 2, 3, 2]
    assert maps[0].gates.shape == (16, 18, 3) and maps[0].modulator_magnitude.shape == (16, 18)
    # the last block of stage 3 (index 2): gates are the last L+1 outputs of its projection f
    block = model.layers[2].blocks[-1]
    captured = {}
    hook = block.modulation.f.register_forward_hook(lambda m, i, o: captured.setdefault("f", o))
    model(image)
    hook.remove()
    np.testing.assert_allclose(maps[2].gates, captured["f"][0, ..., -4:].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert all(not m.record_maps and m.last_gates is None for _, _, m in model.modulation_layers())


@pytest.mark.slow
def test_modulation_maps_cli(trained, tmp_path: Path) -> None:
    config, ckpt, _ = trained
    images = _images(tmp_path / "imgs")
    out = tmp_path / "maps"
    cli_main(["modulation-maps", "--config", str(config), "--ckpt_path", str(ckpt), "--images", str(images),
              "--output", str(out), "--display_size", "64"])
    grid = Image.open(out / "img0_modulation.png")
    # rows: 4 stages; columns: image + gates (up to 3 levels + global) + |modulator|
    assert grid.size == (70 + 6 * (64 + 4), 22 + 4 * (64 + 4))
    names = sorted(p.name for p in (out / "img0").iterdir())
    assert "stage3_gate3.png" in names and "stage1_gate_global.png" in names and "stage4_modulator.png" in names
    assert len(names) == 4 + 4 + 5 + 4  # (levels + global + modulator) per stage
    overlay = np.asarray(Image.open(out / "img0" / "stage1_modulator.png")).astype(float)
    assert overlay.shape == (64, 64, 3) and overlay.std() > 5
    # from a backbone export alone, on a single file
    export = tmp_path / "b.safetensors"
    cli_main(["export", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(export)])
    cli_main(["modulation-maps", "--weights", str(export), "--images", str(images / "img1.png"),
              "--output", str(tmp_path / "maps2"), "--image_size", "32"])
    assert (tmp_path / "maps2" / "img1_modulation.png").is_file()


def test_predict_writes_pictures_and_json(trained, tmp_path: Path) -> None:
    from datamodules.imagenet import ImageNetDataModule

    _, _, task = trained
    root = tmp_path / "data"
    for name in "abcd":
        _images(root / "val" / name, count=1, size=32)
    out = tmp_path / "pred"
    task.hparams.predict_output_dir = str(out)
    datamodule = ImageNetDataModule(root=str(root), image_size=32, batch_size=2, num_workers=0,
                                    predict_root=str(root / "val"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.predict(task, datamodule)
    results = json.loads((out / "predictions.json").read_text())
    assert len(results) == 4 and all(len(r["top5"]) == 4 for r in results)
    picture = Image.open(results[0]["picture"])
    assert picture.width >= 224 and picture.height > picture.width  # image + label panel below


def test_sample_predictions_reach_tensorboard(trained, tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from datamodules.imagenet import ImageNetDataModule

    _, _, task = trained
    root = tmp_path / "data"
    for split in ("train", "val"):
        for name in "abcd":
            _images(root / split / name, count=2, size=32)
    datamodule = ImageNetDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0,
                                    randaugment_num_ops=0, random_erasing_prob=0.0)
    task.hparams.log_samples = 3
    task.hparams.lr_reference_batch = None
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=1, limit_val_batches=2, logger=logger,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(task, datamodule)
    assert any(isinstance(cb, SamplePredictionLogger) for cb in trainer.callbacks)
    events = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["val_samples/0", "val_samples/1", "val_samples/2"]
    image = events.Images("val_samples/0")[0]
    assert image.width >= 224 and image.height > image.width


@pytest.mark.slow
def test_export_of_the_best_run_feeds_a_detectron2_backbone(trained, tmp_path: Path) -> None:
    """The demo chain: ``export --ckpt_path best`` of a classification run -> ``MODEL.FOCALNET.WEIGHTS``."""
    from detectron2.layers import ShapeSpec
    from detectron2.modeling import BACKBONE_REGISTRY

    from focalnet_pl.d2 import build_detectron2_cfg

    config, ckpt, task = trained
    run = tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints"
    run.mkdir(parents=True)
    best = run / "epoch003-val_acc10.9000.ckpt"
    best.write_bytes(ckpt.read_bytes())
    state = torch.load(ckpt, weights_only=True)
    state["callbacks"] = {"ModelCheckpoint{'monitor': 'val/acc1'}": {"best_model_path": str(best)}}
    state["state_dict"] = {k: torch.zeros_like(v) for k, v in state["state_dict"].items()}  # last != best
    torch.save(state, run / "last.ckpt")
    recipe = yaml.safe_load(config.read_text())
    recipe["trainer"] = {"default_root_dir": str(tmp_path / "runs")}
    config.write_text(yaml.safe_dump(recipe))

    output = tmp_path / "backbone.safetensors"
    cli_main(["export", "--config", str(config), "--ckpt_path", "best", "--output", str(output)])
    cfg = build_detectron2_cfg({"MODEL": {"FOCALNET": {
        "VARIANT": "focalnet_tiny_srf", "EMBED_DIM": 8, "DEPTHS": [1, 1, 2, 1], "FOCAL_LEVELS": [2, 2, 3, 2],
        "WEIGHTS": str(output),
    }}})
    backbone = BACKBONE_REGISTRY.get("build_focalnet_backbone")(cfg, ShapeSpec(channels=3))
    trained_weights = task.model.state_dict()
    loaded = backbone.body.state_dict()
    shared = [name for name in loaded if name in trained_weights]  # all but the dense mode's output norms
    assert "layers.3.blocks.0.modulation.f.weight" in shared
    assert all(name.startswith("norm") and name[4].isdigit() for name in loaded if name not in trained_weights)
    for name in shared:
        assert torch.equal(loaded[name], trained_weights[name]), name

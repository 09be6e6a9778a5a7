"""Classification task: optimizer groups, schedule, learning, fine-tuning, CLI configs."""
import json
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from datamodules import ImageNetDataModule
from focalnet_pl.cli import FocalNetCLI
from focalnet_pl.ema import ModelEMA
from focalnet_pl.optim import lr_factor, param_groups
from focalnet_pl.tasks import ClassificationTask
from helpers import TINY, write_imagefolder

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_weight_decay_groups_exclude_norms_biases_and_layerscale():
    task = ClassificationTask(variant="focalnet_large_fl3", num_classes=3, model_overrides=TINY)
    groups = {g["name"]: g for g in param_groups(task.model.named_parameters(), 0.05)}
    decay, no_decay = groups["default/decay"], groups["default/no_decay"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith("weight") and "norm" not in n and "gamma" not in n for n in decay["param_names"])
    assert "layers.0.blocks.0.modulation.f.weight" in decay["param_names"]
    assert "layers.0.blocks.0.modulation.focal_layers.0.0.weight" in decay["param_names"]
    assert {"layers.0.blocks.0.gamma_1", "layers.0.blocks.0.norm1.weight", "head.bias", "norm.weight"} <= set(
        no_decay["param_names"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(task.model.parameters()))
    # the official script's keyword set {''} matches every name (nothing decayed); here exactly the weight
    # matrices and convolution kernels are
    assert set(decay["param_names"]) == {n for n, p in task.model.named_parameters() if p.ndim > 1}


def test_warmup_cosine_schedule_shape():
    lrs = [lr_factor(s, decay="cosine", total_steps=100, warmup_steps=10, warmup_factor=0.0, min_factor=0.01)
           for s in range(101)]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(0.5) and lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.505, abs=1e-3) and lrs[100] == pytest.approx(0.01)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def _trainer(tmp_path: Path, **kw) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, **kw)


def test_learns_separable_data_with_mixup_and_ema(tmp_path):
    root = write_imagefolder(tmp_path / "data")
    dm = ImageNetDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0, pin_memory=False,
                            persistent_workers=False, randaugment_num_ops=0, color_jitter=0.0, random_erasing_prob=0.0,
                            train_crop_scale=(0.8, 1.0), eval_crop_ratio=1.0)
    task = ClassificationTask(model_overrides=TINY, lr=3e-3, lr_reference_batch=None, warmup_epochs=0,
                              mixup_alpha=0.2, cutmix_alpha=1.0, ema_decay=0.9)
    trainer = _trainer(tmp_path, max_epochs=6, num_sanity_val_steps=0)
    trainer.fit(task, datamodule=dm)
    assert task.hparams.num_classes == 2 and task.hparams.class_names == ["bright", "dark"]
    metrics = trainer.validate(task, datamodule=dm, verbose=False)[0]
    assert metrics["val/acc1"] == 1.0
    assert any(isinstance(c, ModelEMA) and c.decay == 0.9 for c in trainer.callbacks)


def test_finetune_to_other_classes_and_resolution(tmp_path, caplog):
    src = ClassificationTask(num_classes=5, model_overrides=TINY)
    ckpt = tmp_path / "pre.pth"
    torch.save({"model": src.model.state_dict()}, ckpt)
    with caplog.at_level("INFO"):
        task = ClassificationTask(num_classes=3, weights=str(ckpt), model_overrides=TINY)
    assert "head.weight" in caplog.text
    torch.testing.assert_close(task.model.layers[1].blocks[0].mlp.fc1.weight, src.model.layers[1].blocks[0].mlp.fc1.weight)
    assert task(torch.randn(1, 3, 96, 96)).shape == (1, 3)  # another resolution


def test_predict_writes_top5_json(tmp_path):
    root = write_imagefolder(tmp_path / "data", n_per_class=2)
    dm = ImageNetDataModule(root=str(root), image_size=32, batch_size=4, num_workers=0, pin_memory=False,
                            persistent_workers=False, predict_root=str(root / "val" / "dark"), eval_crop_ratio=1.0)
    task = ClassificationTask(model_overrides=TINY, predict_output_dir=str(tmp_path / "pred"))
    _trainer(tmp_path).predict(task, datamodule=dm)
    results = json.loads((tmp_path / "pred" / "predictions.json").read_text())
    assert len(results) == 2 and {r["top5"][0]["label"] for r in results} <= {"bright", "dark"}
    assert abs(sum(t["score"] for t in results[0]["top5"]) - 1.0) < 1e-4


def _cli(args: list[str]) -> FocalNetCLI:
    return FocalNetCLI(args=args, run=False)


@pytest.mark.slow
def test_every_classification_config_parses_and_builds(tmp_path):
    root = write_imagefolder(tmp_path / "data", n_per_class=1)
    for path in sorted((CONFIGS / "classification").glob("*.yaml")):
        cli = _cli(["--config", str(path), "--data.init_args.root", str(root), "--trainer.devices", "1",
                    "--trainer.accelerator", "cpu", "--trainer.strategy", "auto", "--trainer.precision", "32",
                    "--model.init_args.weights", "null", "--model.init_args.num_classes", "2",
                    "--model.init_args.model_overrides", json.dumps(TINY)])
        assert isinstance(cli.model, ClassificationTask), path
        variant = yaml.safe_load(path.read_text())["model"]["init_args"]["variant"]
        assert cli.model.hparams.variant == variant


@pytest.mark.slow
def test_cli_fit_then_test_few_steps_and_composed_configs(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "data", n_per_class=4)
    override = tmp_path / "small.yaml"
    override.write_text(yaml.safe_dump({"trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2,
                                                    "default_root_dir": str(tmp_path / "run"), "devices": 1,
                                                    "accelerator": "cpu", "strategy": "auto", "precision": "32"}}))
    common = ["--config", str(CONFIGS / "classification" / "focalnet_tiny_srf.yaml"), "--config", str(override),
              "--data.init_args.root", str(root), "--data.init_args.image_size", "32",
              "--data.init_args.batch_size", "4", "--data.init_args.num_workers", "0",
              "--model.init_args.model_overrides", json.dumps(TINY)]
    FocalNetCLI(args=["fit", *common])
    ckpts = list((tmp_path / "run").rglob("last.ckpt"))
    assert ckpts, "ModelCheckpoint(save_last=True) wrote no last.ckpt"
    FocalNetCLI(args=["test", *common, "--ckpt_path", str(ckpts[0])])
    assert "test/acc1" in capsys.readouterr().out


@pytest.mark.slow
def test_unknown_config_key_is_reported(capsys):
    with pytest.raises(SystemExit):
        _cli(["--config", str(CONFIGS / "classification" / "focalnet_tiny_srf.yaml"), "--model.init_args.lrr", "1"])
    assert "lrr" in capsys.readouterr().err

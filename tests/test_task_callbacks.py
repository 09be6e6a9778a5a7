"""Task callbacks: a configured ModelCheckpoint is the one that runs; the task's defaults fill only what is missing."""
from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import instantiate_class
from lightning.pytorch.loggers import CSVLogger
from test_classification import TINY, _write_imagefolder

from focalnet_pl.cli import FocalNetCLI, resolve_checkpoint_alias
from focalnet_pl.reliability import AtomicCheckpointIO
from focalnet_pl.tasks import ClassificationTask
from focalnet_pl.tasks.callbacks import LastCheckpointEveryNSteps, RandomStateCheckpoint, default_task_callbacks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
WITH_CHECKPOINT = [p for p in sorted(CONFIGS.rglob("*.yaml")) if "ModelCheckpoint" in p.read_text()]


def test_the_configs_that_choose_a_checkpoint_metric() -> None:
    monitors = [yaml.safe_load(p.read_text())["trainer"]["callbacks"][0]["init_args"]["monitor"] for p in WITH_CHECKPOINT]
    assert len(WITH_CHECKPOINT) == 22
    assert monitors.count("val/segm_AP") == 12 and monitors.count("val/AP") == 4
    assert sorted(set(monitors) - {"val/segm_AP", "val/AP"}) == ["val/PQ", "val/mIoU"]


@pytest.mark.parametrize("config", WITH_CHECKPOINT, ids=lambda p: p.stem)
def test_every_config_keeps_its_model_checkpoint(config: Path, tmp_path: Path) -> None:
    configured = yaml.safe_load(config.read_text())["trainer"]["callbacks"]
    trainer = L.Trainer(callbacks=[instantiate_class((), c) for c in configured], logger=CSVLogger(tmp_path),
                        default_root_dir=tmp_path)
    before = list(trainer.callbacks)
    added = default_task_callbacks(trainer, monitor="val/task_metric", checkpoint_every_n_steps=100, log_samples=2)
    assert trainer.callbacks == before  # nothing of the user's removed
    assert [type(c) for c in added if isinstance(c, (ModelCheckpoint, LearningRateMonitor))] == []  # the YAML has both
    assert {type(c).__name__ for c in added} == {"LastCheckpointEveryNSteps", "SamplePredictionLogger",
                                                "RandomStateCheckpoint"}
    assert [c.monitor for c in trainer.checkpoint_callbacks] == [configured[0]["init_args"]["monitor"]]


def test_defaults_replace_only_lightnings_placeholder(tmp_path: Path) -> None:
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path)  # Lightning adds ModelCheckpoint() itself
    added = default_task_callbacks(trainer, monitor="val/loss", mode="min")
    assert trainer.checkpoint_callbacks == []  # the placeholder is gone, not "overridden" with a notice
    (checkpoint,) = [c for c in added if isinstance(c, ModelCheckpoint)]
    assert (checkpoint.monitor, checkpoint.mode, checkpoint.save_last) == ("val/loss", "min", True)
    assert not any(isinstance(c, (LearningRateMonitor, LastCheckpointEveryNSteps)) for c in added)  # no logger, no N
    explicit = ModelCheckpoint(monitor="val/acc1", mode="max")
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, callbacks=[explicit, RandomStateCheckpoint()])
    assert default_task_callbacks(trainer, monitor="val/loss") == [] and trainer.checkpoint_callbacks == [explicit]
    no_checkpoints = L.Trainer(logger=False, enable_checkpointing=False)
    added = default_task_callbacks(no_checkpoints, "val/loss", checkpoint_every_n_steps=1)
    assert [type(c) for c in added] == [RandomStateCheckpoint]


def test_yaml_checkpoint_runs_beside_the_every_n_steps_last_checkpoint(tmp_path: Path) -> None:
    """A real fit: the config's ModelCheckpoint (best val/loss, its own file names) is the one that runs,
    while the task still refreshes last.ckpt every step; writes go through the atomic CheckpointIO plugin."""
    root = _write_imagefolder(tmp_path / "data", n_per_class=4)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                               "init_args": {"save_dir": str(tmp_path), "name": "run", "version": 0}},
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"monitor": "val/loss", "mode": "min", "save_last": True,
                                                 "filename": "best-{val/loss:.3f}", "auto_insert_metric_name": False}}]},
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask",
                  "init_args": {"model_overrides": TINY, "lr_reference_batch": None, "checkpoint_every_n_steps": 1,
                                "log_samples": 0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}},
        "data": {"class_path": "datamodules.ImageNetDataModule",
                 "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0}},
    }))
    cli = FocalNetCLI(args=["fit", "--config", str(config)])
    trainer = cli.trainer
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    (best,) = trainer.checkpoint_callbacks
    assert best.monitor == "val/loss" and best.mode == "min"
    assert Path(best.best_model_path).name.startswith("best-")
    assert float(best.best_model_score) == min(float(v) for v in _logged(tmp_path, "val/loss"))
    assert sum(isinstance(c, LastCheckpointEveryNSteps) for c in trainer.callbacks) == 1
    assert sum(isinstance(c, LearningRateMonitor) for c in trainer.callbacks) == 1
    folder = Path(best.dirpath)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # every step, ours
    assert (folder / "last-v1.ckpt").is_file()  # the config's save_last, beside it
    newest = resolve_checkpoint_alias(tmp_path, "last")
    assert torch.load(newest, weights_only=True)["global_step"] == 4
    assert resolve_checkpoint_alias(tmp_path, "best") == Path(best.best_model_path)


def _logged(root: Path, key: str) -> list[str]:
    with open(root / "run" / "version_0" / "metrics.csv") as handle:
        return [row[key] for row in csv.DictReader(handle) if row.get(key)]


def test_monitor_is_a_task_setting() -> None:
    task = ClassificationTask(num_classes=2, model_overrides=TINY, monitor="val/loss", monitor_mode="min")
    task.trainer = L.Trainer(logger=False)
    (checkpoint,) = [c for c in task.configure_callbacks() if isinstance(c, ModelCheckpoint)]
    assert (checkpoint.monitor, checkpoint.mode) == ("val/loss", "min")
    assert ClassificationTask(num_classes=2, model_overrides=TINY).hparams.monitor == "val/acc1"

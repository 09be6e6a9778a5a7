"""The command line: a plain ``cli.py fit`` prints no warning the user did not cause; ``--ckpt_path best|last``."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from focalnet_pl.cli import FocalNetCLI
from helpers import TINY, write_imagefolder

REPO = Path(__file__).resolve().parents[1]
#: what Python's and Lightning's warnings look like on stderr (``path.py:12: Message``, ``...Warning: ...``)
WARNING_LINE = re.compile(r"^\S+\.py:\d+: |Warning\b|💡|Tip:|will override")


@pytest.mark.slow
def test_plain_fit_is_quiet_then_test_finds_best(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path / "data", n_per_class=4)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 2, "limit_train_batches": 2, "limit_val_batches": 2, "log_every_n_steps": 1,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "runs")},
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask",
                  "init_args": {"model_overrides": TINY, "lr_reference_batch": None, "log_samples": 0}},
        "data": {"class_path": "datamodules.ImageNetDataModule",
                 "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0}},
    }))
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    fit = subprocess.run([sys.executable, "cli.py", "fit", "--config", str(config),
                          "--model.init_args.monitor", "val/loss", "--model.init_args.monitor_mode", "min"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 0, fit.stderr[-3000:]
    noise = [line for line in fit.stderr.splitlines() if WARNING_LINE.search(line)]
    assert noise == [], "\n".join(noise)
    assert "Seed set to 0" in fit.stderr  # the messages that tell the user something stay
    (folder,) = (tmp_path / "runs").glob("lightning_logs/version_*/checkpoints")
    (best,) = folder.glob("epoch*-val_loss*.ckpt")  # the task's default ModelCheckpoint, on the `monitor` setting
    state = torch.load(folder / "last.ckpt", weights_only=True)
    (checkpoint_state,) = [v for k, v in state["callbacks"].items() if k.startswith("ModelCheckpoint")]
    assert Path(checkpoint_state["best_model_path"]) == best and "'mode': 'min'" in next(
        k for k in state["callbacks"] if k.startswith("ModelCheckpoint"))

    tested = FocalNetCLI(args=["test", "--config", str(config), "--ckpt_path", "best"])
    assert tested.config.test.ckpt_path == str(best)  # resolved before Lightning read its hyper-parameters
    assert "test/acc1" in tested.trainer.callback_metrics


def test_arguments_the_user_gives_win_over_the_checkpoint(tmp_path: Path) -> None:
    """With --ckpt_path, LightningCLI applies the checkpoint's hyper-parameters to the config; what the
    --config files and the command line set wins, the checkpoint fills in the rest (classes from the data)."""
    root = write_imagefolder(tmp_path / "data", n_per_class=2)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "limit_train_batches": 1, "limit_val_batches": 1, "logger": False,
                    "enable_progress_bar": False, "default_root_dir": str(tmp_path / "runs")},
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask",
                  "init_args": {"model_overrides": TINY, "lr_reference_batch": None, "log_samples": 0}},
        "data": {"class_path": "datamodules.ImageNetDataModule",
                 "init_args": {"root": str(root), "image_size": 32, "batch_size": 4, "num_workers": 0,
                               "predict_root": str(root / "val")}},
    }))
    FocalNetCLI(args=["fit", "--config", str(config), "--model.init_args.predict_output_dir", str(tmp_path / "fit_out"),
                      "--model.init_args.label_smoothing", "0.2"])
    (ckpt,) = (tmp_path / "runs").glob("**/last.ckpt")
    saved = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert saved["predict_output_dir"] == str(tmp_path / "fit_out") and saved["warmup_epochs"] == 20.0

    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump({"model": {"init_args": {"warmup_epochs": 3.0}}}))
    predicted = FocalNetCLI(args=[
        "predict", "--config", str(config), "--config", str(extra), "--ckpt_path", str(ckpt),
        "--model.init_args.predict_output_dir", str(tmp_path / "typed_out"), "--model.init_args.predict_draw", "false",
    ])
    assert (tmp_path / "typed_out" / "predictions.json").is_file() and not (tmp_path / "fit_out").exists()
    hparams = predicted.model.hparams
    assert hparams.warmup_epochs == 3.0 and hparams.predict_draw is False  # --config file, command line
    assert hparams.label_smoothing == 0.2 and hparams.class_names == ["bright", "dark"]  # from the checkpoint


def test_predict_keeps_no_outputs_in_memory_by_default(tmp_path: Path, capsys) -> None:
    """The writers write the predictions; ``return_predictions`` would hold every output of the run."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask", "init_args": {"model_overrides": TINY}},
        "data": {"class_path": "datamodules.ImageNetDataModule", "init_args": {"root": str(tmp_path)}},
    }))
    for extra, expected in (([], False), (["--return_predictions", "true"], True)):
        with pytest.raises(SystemExit):
            FocalNetCLI(args=["predict", "--config", str(config), *extra, "--print_config"])
        assert yaml.safe_load(capsys.readouterr().out)["return_predictions"] is expected

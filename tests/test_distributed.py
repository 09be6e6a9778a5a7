"""Multi-process training on CPU (gloo): DDP equals a 1-process run; FSDP2 fit, resume, reuse, consolidation.

The FSDP2 worker at the bottom of this file runs under ``torchrun`` (this file is its script), so the sharded
runs never re-execute pytest. Everything is tiny: 16-wide FocalNet, one block per stage, 32 px images.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from helpers import TINY, write_imagefolder

REPO = Path(__file__).resolve().parents[1]
# no randomness in the data pipeline: full-image "crops", no flips or colour jitter
DETERMINISTIC_DATA = {"image_size": 32, "num_workers": 0, "pin_memory": False, "persistent_workers": False,
                      "randaugment_num_ops": 0, "color_jitter": 0.0, "random_erasing_prob": 0.0, "hflip_prob": 0.0,
                      "train_crop_scale": (1.0, 1.0), "train_crop_ratio": (1.0, 1.0), "eval_crop_ratio": 1.0}
TASK_ARGS = {"model_overrides": TINY, "lr": 3e-3, "lr_reference_batch": None, "warmup_epochs": 0, "mixup_alpha": 0.0,
             "cutmix_alpha": 0.0, "label_smoothing": 0.0, "log_samples": 0}


def noisy_imagefolder(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """Two classes that overlap (dark vs bright with much noise): the loss keeps moving."""
    return write_imagefolder(root, train_per_class, val_per_class=val_per_class, levels=(90, 160), noise=60)


def _datamodule(root: Path, batch_size: int):
    from datamodules import ImageNetDataModule

    return ImageNetDataModule(root=str(root), batch_size=batch_size, **DETERMINISTIC_DATA)


def _task(**overrides):
    from focalnet_pl.tasks import ClassificationTask

    L.seed_everything(0)
    return ClassificationTask(**(TASK_ARGS | overrides))


def _trainer(root_dir: Path, **kwargs) -> L.Trainer:
    defaults = {"default_root_dir": root_dir, "accelerator": "cpu", "logger": False, "enable_progress_bar": False,
                "enable_model_summary": False, "enable_checkpointing": False, "num_sanity_val_steps": 0}
    return L.Trainer(**(defaults | kwargs))


@pytest.mark.slow
def test_ddp_two_processes_match_one_process_with_same_global_batch(tmp_path):
    """Each step sees the whole 16-image train set (1 x 16 vs 2 x 8), so only the reduction order differs:
    DDP averages the ranks' mean gradients, which equals the global mean for equal per-rank batches."""
    root = noisy_imagefolder(tmp_path / "data")
    single = _task(num_classes=2)
    trainer1 = _trainer(tmp_path / "one", devices=1, max_epochs=3)
    trainer1.fit(single, datamodule=_datamodule(root, batch_size=16))
    metrics1 = {k: float(v) for k, v in trainer1.callback_metrics.items()}

    ddp = _task(num_classes=2)
    trainer2 = _trainer(tmp_path / "two", devices=2, strategy="ddp_spawn", max_epochs=3)
    trainer2.fit(ddp, datamodule=_datamodule(root, batch_size=8))
    metrics2 = {k: float(v) for k, v in trainer2.callback_metrics.items()}

    assert trainer1.global_step == 3 and trainer2.world_size == 2  # (spawn does not hand back the loop state)
    # val/loss (sync_dist) and val/acc1 (torchmetrics) cover all 8 val images only when synced over both ranks
    assert set(metrics1) >= {"val/loss", "val/acc1", "train/loss"}
    assert metrics2["val/loss"] == pytest.approx(metrics1["val/loss"], rel=1e-4, abs=1e-5)
    assert metrics2["val/acc1"] == pytest.approx(metrics1["val/acc1"], abs=1e-6)
    # ddp_spawn hands rank 0's trained weights back to this process
    params1, params2 = dict(single.named_parameters()), dict(ddp.named_parameters())
    assert params1.keys() == params2.keys()
    untrained = _task(num_classes=2)
    assert not torch.allclose(params1["model.head.weight"], untrained.model.head.weight)
    for name, value in params1.items():
        torch.testing.assert_close(params2[name], value, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.slow
def test_strategy_configs_compose_with_a_task_config(tmp_path):
    from focalnet_pl.cli import FocalNetCLI
    from focalnet_pl.distributed import FSDP2Strategy

    root = noisy_imagefolder(tmp_path / "data", train_per_class=1, val_per_class=1)
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False,
                    "strategy": {"class_path": "lightning.pytorch.strategies.DDPStrategy",
                                 "init_args": {"gradient_as_bucket_view": True}}},
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask", "init_args": {"model_overrides": TINY}},
        "data": {"class_path": "datamodules.ImageNetDataModule",
                 "init_args": {"root": str(root), **{k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in DETERMINISTIC_DATA.items()}}},
    }))
    cli = FocalNetCLI(args=["--config", str(base), "--config", str(REPO / "configs/strategy/fsdp.yaml"),
                            "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "4"],
                      run=False)
    strategy = cli.trainer.strategy
    assert isinstance(strategy, FSDP2Strategy) and strategy.num_nodes == 4
    policy = strategy.sharding_policy
    assert policy.activation_checkpointing and policy.param_dtype == torch.bfloat16
    assert policy.reduce_dtype == torch.float32 and strategy.state_dict_type == "sharded"
    assert "focalnet_pl.focalnet.FocalNetBlock" in policy.block_types
    assert "focalnet_pl.dino.transformer.DecoderLayer" in policy.block_types
    ddp = FocalNetCLI(args=["--config", str(base), "--config", str(REPO / "configs/strategy/ddp.yaml"),
                            "--trainer.accelerator", "cpu", "--trainer.devices", "1"], run=False)
    assert type(ddp.trainer.strategy).__name__ == "DDPStrategy"
    with pytest.raises(ValueError, match="param_dtype='float8'"):
        FSDP2Strategy(param_dtype="float8")


def test_end_process_group_waits_for_every_rank_then_destroys_the_group(tmp_path):
    from focalnet_pl.distributed import end_process_group

    end_process_group()  # no group: nothing to do
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    assert torch.distributed.is_initialized()
    end_process_group()
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_fsdp2_fit_resume_reuse_and_consolidate(tmp_path):
    from focalnet_pl import create_focalnet
    from focalnet_pl.distributed import consolidate_checkpoint, is_distributed_checkpoint

    root = noisy_imagefolder(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         __file__, str(root), str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    # (b) sharded fit: every FocalNet block is its own FSDP unit and parameters are split over the 2 ranks
    assert report["world_size"] == 2 and report["strategy"] == "FSDP2Strategy"
    assert report["blocks_sharded"] == report["num_blocks"] == 4
    # the strategy's per-block activation checkpointing replaced the model's own (task built with it on)
    assert report["blocks_checkpointed"] == 4 and not report["model_grad_checkpointing"]
    assert report["local_numel"] < 0.6 * report["full_numel"]
    # (c) validate/fit again on the same Trainer and module: configure_model runs again, shards nothing twice
    assert report["reuse_shard_calls"] == [True, False, False]
    assert report["units_after_first_fit"] == report["units_after_reuse"]
    # resume from the sharded folder: training continues where it stopped, from the saved weights
    first = Path(report["first_checkpoint"])
    assert is_distributed_checkpoint(first)
    assert report["resumed_start_step"] == report["first_global_step"] == 2 and report["resumed_global_step"] == 4

    consolidated = consolidate_checkpoint(first, tmp_path / "full.ckpt")
    checkpoint = torch.load(consolidated, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["epoch"] == 1  # saved after the epoch ended
    start = torch.load(report["resume_start_weights"], weights_only=True)
    for name, value in start.items():
        torch.testing.assert_close(checkpoint["state_dict"][name], value, msg=name)

    # state_dict_type="full": one file written by rank 0, loadable as it is
    full = Path(report["full_checkpoint"])
    assert full.is_file()
    full_model = create_focalnet("focalnet_tiny_srf", num_classes=2, weights=str(full), **TINY)
    torch.testing.assert_close(full_model.head.weight, torch.tensor(report["full_head_weight"]))

    backbone = create_focalnet("focalnet_tiny_srf", num_classes=2, weights=str(consolidated), **TINY)
    torch.testing.assert_close(backbone.head.weight, checkpoint["state_dict"]["model.head.weight"])

    task = _task()
    tested = _trainer(tmp_path / "test", devices=1).test(
        task, datamodule=_datamodule(root, batch_size=8), ckpt_path=str(consolidated), weights_only=True)
    assert tested[0]["test/acc1"] == pytest.approx(report["val_acc1_after_first_fit"], abs=1e-6)
    torch.testing.assert_close(task.model.head.weight, checkpoint["state_dict"]["model.head.weight"])


# ---------------------------------------------------------------------------------------------------------
# torchrun worker (2 processes): python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py
# ---------------------------------------------------------------------------------------------------------
def _fsdp_worker(data_root: Path, out: Path) -> None:
    from lightning.pytorch.callbacks import Callback
    from torch.distributed._composable import checkpoint as activation_checkpoint
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from focalnet_pl.distributed import FSDP2Strategy, end_process_group
    from focalnet_pl.focalnet import FocalNetBlock
    from focalnet_pl.tasks import classification

    calls: list[bool] = []
    original = classification.maybe_fully_shard

    def recording_shard(module, block_types=()):
        calls.append(original(module, block_types))
        return calls[-1]

    classification.maybe_fully_shard = recording_shard

    def fsdp_trainer(root_dir: Path, max_epochs: int, callbacks=(), state_dict_type="sharded") -> L.Trainer:
        strategy = FSDP2Strategy(block_types=["FocalNetBlock"], activation_checkpointing=True,
                                 state_dict_type=state_dict_type, process_group_backend="gloo")
        return _trainer(root_dir, devices=2, strategy=strategy, max_epochs=max_epochs, limit_train_batches=2,
                        limit_val_batches=2, gradient_clip_val=1.0, callbacks=list(callbacks))

    def units(task) -> int:
        return sum(isinstance(m, FSDPModule) for m in task.modules())

    report: dict = {}
    task = _task(num_classes=2, grad_checkpointing=True)
    trainer = fsdp_trainer(out / "first", max_epochs=1)
    trainer.fit(task, datamodule=_datamodule(data_root, batch_size=4))
    blocks = [m for m in task.model.modules() if isinstance(m, FocalNetBlock)]
    weight = task.model.layers[0].blocks[0].mlp.fc1.weight
    report |= {
        "world_size": trainer.world_size, "strategy": type(trainer.strategy).__name__,
        "num_blocks": len(blocks), "blocks_sharded": sum(isinstance(b, FSDPModule) for b in blocks),
        "blocks_checkpointed": sum(activation_checkpoint.state(b) is not None for b in blocks),
        "model_grad_checkpointing": any(stage.grad_checkpointing for stage in task.model.layers),
        "local_numel": sum(p.to_local().numel() for p in task.parameters() if isinstance(p, DTensor)),
        "full_numel": sum(p.numel() for p in task.parameters()),
        "first_global_step": trainer.global_step, "units_after_first_fit": units(task),
        "first_checkpoint": str(out / "first.ckpt"),
    }
    trainer.save_checkpoint(report["first_checkpoint"])  # sharded: a folder with one file per rank
    assert isinstance(weight, DTensor)
    report["val_acc1_after_first_fit"] = float(trainer.validate(task, datamodule=_datamodule(data_root, 4),
                                                                verbose=False)[0]["val/acc1"])
    trainer.fit_loop.max_epochs = 2  # the same Trainer fits once more: configure_model runs again
    trainer.fit(task, datamodule=_datamodule(data_root, batch_size=4))
    report["units_after_reuse"] = units(task)
    report["reuse_shard_calls"] = list(calls)

    class RecordStart(Callback):
        def on_train_start(self, trainer, pl_module):
            state = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                     for name, p in pl_module.named_parameters()}
            report["resumed_start_step"] = trainer.global_step
            if trainer.is_global_zero:
                torch.save(state, out / "resume_start.pt")

    resumed = _task(num_classes=2)
    trainer = fsdp_trainer(out / "resumed", max_epochs=2, callbacks=[RecordStart()])
    trainer.fit(resumed, datamodule=_datamodule(data_root, batch_size=4), ckpt_path=report["first_checkpoint"])
    report["resumed_global_step"] = trainer.global_step
    report["resume_start_weights"] = str(out / "resume_start.pt")

    full = _task(num_classes=2)
    trainer = fsdp_trainer(out / "full", max_epochs=1, state_dict_type="full")
    trainer.fit(full, datamodule=_datamodule(data_root, batch_size=4))
    report["full_checkpoint"] = str(out / "full.ckpt")
    trainer.save_checkpoint(report["full_checkpoint"])  # gathered on rank 0 into one file
    report["full_head_weight"] = full.model.head.weight.full_tensor().tolist()
    if trainer.is_global_zero:
        (out / "report.json").write_text(json.dumps(report))
    end_process_group()


if __name__ == "__main__":
    torch.set_num_threads(1)
    _fsdp_worker(Path(sys.argv[1]), Path(sys.argv[2]))

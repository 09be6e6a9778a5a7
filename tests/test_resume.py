"""Fault tolerance: SIGKILL mid-epoch + ``--ckpt_path last`` == uninterrupted run (weights and their EMA);
atomic checkpoint writes."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.loading import GuardedDataset, GuardedLoader, ResumableSampler
from focalnet_pl.ema import EMA_STATE_KEY, TRAINED_STATE_KEY
from focalnet_pl.io import atomic_torch_save
from focalnet_pl.reliability import AtomicCheckpointIO
from focalnet_pl.weights import CheckpointError

REPO = Path(__file__).resolve().parents[1]
STEPS_PER_EPOCH = 6  # 24 images, batch 4
KILL_AT_STEP = 8  # epoch 1, batch 2


class PauseAtStep(L.Callback):
    """Test helper loaded by the CLI subprocess: at ``step`` it touches ``marker`` and waits to be killed."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            Path(self.marker).touch()
            time.sleep(120)


def _make_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 3)):
        for c, name in enumerate(("dark", "mid", "bright")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(60 + 70 * c, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")


def _config(tmp_path: Path, log_dir: Path) -> Path:
    config = tmp_path / f"{log_dir.name}.yaml"
    config.write_text(textwrap.dedent(f"""
        seed_everything: 0
        trainer:
          accelerator: cpu
          devices: 1
          max_epochs: 2
          deterministic: true
          limit_val_batches: 2
          log_every_n_steps: 1
          enable_progress_bar: false
          enable_model_summary: false
          logger:
            class_path: lightning.pytorch.loggers.CSVLogger
            init_args: {{save_dir: {log_dir}, name: run, version: 0}}
        model:
          class_path: focalnet_pl.tasks.ClassificationTask
          init_args:
            model_overrides: {{embed_dim: 8, depths: [1, 1, 1, 1], drop_path_rate: 0.2}}
            lr: 1.0e-3
            lr_reference_batch: null
            warmup_epochs: 0.5
            mixup_alpha: 0.0
            cutmix_alpha: 0.0
            checkpoint_every_n_steps: 1
            log_samples: 0
            ema_decay: 0.9
        data:
          class_path: datamodules.ImageNetDataModule
          init_args:
            root: {tmp_path / "data"}
            image_size: 32
            batch_size: 4
            num_workers: 1
            persistent_workers: false
            randaugment_num_ops: 0
            random_erasing_prob: 0.0
            test_split: null
    """))
    return config


def _cli(*args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "tests")]), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(REPO / "cli.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, timeout: float = 600) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]


def _val_rows(log_dir: Path) -> list[dict[str, str]]:
    with open(log_dir / "run" / "version_0" / "metrics.csv") as handle:
        return [row for row in csv.DictReader(handle) if row.get("val/acc1")]


def _train_losses(log_dir: Path) -> dict[int, float]:
    with open(log_dir / "run" / "version_0" / "metrics.csv") as handle:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")}


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    _make_images(tmp_path / "data")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight_cfg, killed_cfg = _config(tmp_path, straight), _config(tmp_path, killed)
    marker = tmp_path / "paused"
    pause = (f'--trainer.callbacks=[{{"class_path": "test_resume.PauseAtStep", '
             f'"init_args": {{"step": {KILL_AT_STEP}, "marker": "{marker}"}}}}]')

    reference = _cli("fit", "--config", str(straight_cfg))
    victim = _cli("fit", "--config", str(killed_cfg), pause)
    try:
        deadline = time.monotonic() + 300  # generous: the CI machine may be shared
        while not marker.exists():
            assert victim.poll() is None, victim.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "the run never reached the kill step"
            time.sleep(0.05)
    except BaseException:
        reference.kill()
        victim.kill()
        raise
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    ckpt_dir = killed / "run" / "version_0" / "checkpoints"
    interrupted = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert interrupted["global_step"] == KILL_AT_STEP
    assert interrupted["global_step"] % STEPS_PER_EPOCH != 0  # mid-epoch
    # the position of the training loader, saved by Lightning's fit loop (StatefulDataLoader state) and by the datamodule
    loader_state = interrupted["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]
    assert loader_state == interrupted["ImageNetDataModule"]["train_loader"]
    sampler_state = loader_state["_snapshot"]["_main_snapshot"]["_sampler_iter_state"]["sampler_state"]
    assert sampler_state["epoch"] == 1 and sampler_state["position"] == (KILL_AT_STEP - STEPS_PER_EPOCH) * 4

    _finish(_cli("fit", "--config", str(killed_cfg), "--ckpt_path", "last"))
    _finish(reference)

    final_straight = torch.load(straight / "run" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert final_straight["global_step"] == final_resumed["global_step"] == 2 * STEPS_PER_EPOCH
    weights = [name for name in final_straight["state_dict"] if name.startswith("model.")]
    assert weights
    for entry in ("state_dict", TRAINED_STATE_KEY):  # the EMA weights, the trained ones
        for name in weights:
            torch.testing.assert_close(final_resumed[entry][name], final_straight[entry][name],
                                       rtol=0, atol=1e-6, msg=f"{entry}: {name}")
    assert final_resumed[EMA_STATE_KEY] == final_straight[EMA_STATE_KEY] == {"updates": 2 * STEPS_PER_EPOCH, "updated_at_step": 2 * STEPS_PER_EPOCH}
    straight_val, resumed_val = _val_rows(straight)[-1], _val_rows(killed)[-1]
    for key in ("val/acc1", "val/acc5", "val/loss"):
        assert abs(float(straight_val[key]) - float(resumed_val[key])) <= 1e-6, key
    straight_losses, resumed_losses = _train_losses(straight), _train_losses(killed)
    after_kill = [step for step in straight_losses if step >= KILL_AT_STEP]
    assert after_kill
    for step in after_kill:
        assert abs(straight_losses[step] - resumed_losses[step]) <= 1e-6, step


_KILL_DURING_SAVE = """
import os, signal, sys, torch
from focalnet_pl.reliability import AtomicCheckpointIO
path = sys.argv[1]
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, path)
def dying_save(obj, handle, *args, **kwargs):
    handle.write(b"PK\\x03\\x04 half a zip file")
    handle.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(1000)}, "global_step": 2}, path)
"""


@pytest.mark.slow
def test_kill_while_saving_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    result = subprocess.run([sys.executable, "-c", _KILL_DURING_SAVE, str(path)], check=False, cwd=REPO, capture_output=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == -signal.SIGKILL
    checkpoint = AtomicCheckpointIO().load_checkpoint(path)
    assert checkpoint["global_step"] == 1 and torch.equal(checkpoint["state_dict"]["w"], torch.ones(1000))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(name.startswith(".last.ckpt.tmp-") for name in leftovers)


def test_atomic_save_cleans_up_after_an_exception(tmp_path: Path) -> None:
    path = atomic_torch_save({"a": torch.ones(2)}, tmp_path / "x.ckpt")

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"a": Unpicklable()}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.ckpt"]
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_truncated_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    path = atomic_torch_save({"a": torch.ones(100)}, tmp_path / "x.ckpt")
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(CheckpointError, match="truncated, corrupt"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


class _Noisy(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), torch.rand(()).item()])  # random "augmentation"


def test_resumable_loader_continues_the_same_order_and_augmentation() -> None:
    def loader(num_workers: int = 0) -> GuardedLoader:
        sampler = ResumableSampler(_Noisy(), shuffle=True, seed=3)
        return GuardedLoader(GuardedDataset(_Noisy(), seed=3), batch_size=2, sampler=sampler, name="train_dataloader",
                             num_workers=num_workers)

    full = loader()
    full.sampler.set_epoch(1)
    batches = iter(full)
    epoch = [next(batches), next(batches)]
    state = full.state_dict()  # after 2 of 5 batches
    epoch += list(batches)
    resumed = loader()
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 3
    for a, b in zip(epoch[2:], rest):
        assert torch.equal(a, b)
    # resumed with a worker (torchdata cannot restore another worker count): the same batches all the same
    in_worker = loader(num_workers=1)
    in_worker.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(epoch[2:], list(in_worker), strict=True))
    other_epoch = loader()
    other_epoch.sampler.set_epoch(2)
    assert not torch.equal(torch.cat(list(other_epoch)), torch.cat(epoch))
    # at the end of an epoch the next one starts from its first batch
    ended = loader()
    ended.sampler.set_epoch(1)
    batches = iter(ended)
    assert len([next(batches) for _ in range(5)]) == 5
    finished = loader()
    finished.load_state_dict(ended.state_dict())
    following = list(finished)
    assert finished.sampler.epoch == 2 and len(following) == 5
    torch.testing.assert_close(torch.cat(following), torch.cat(list(other_epoch)))

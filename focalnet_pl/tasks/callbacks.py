"""Callbacks the tasks add by default (``LightningModule.configure_callbacks``) where the user gave none."""
from __future__ import annotations

import os
import random
from collections.abc import Mapping
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from focalnet_pl.ema import ModelEMA


def is_lightning_default_checkpoint(callback: Callback) -> bool:
    """Whether ``callback`` is the ``ModelCheckpoint()`` Lightning adds itself when none was given.

    (A ``ModelCheckpoint`` configured with every argument at its default is indistinguishable from it.)
    """
    default = ModelCheckpoint()
    return (type(callback) is ModelCheckpoint and callback.state_key == default.state_key
            and callback.dirpath is None and callback.filename is None and callback.save_last is None
            and callback.save_top_k == default.save_top_k)


def default_task_callbacks(trainer: L.Trainer, monitor: str, mode: Literal["max", "min"] = "max",
                           checkpoint_every_n_steps: int | None = None, log_samples: int = 0,
                           ema_decay: float | None = None) -> list[Callback]:
    """What a task adds to ``trainer``'s callbacks: only the kinds the user did not configure.

    * ``ModelCheckpoint`` keeping the best ``monitor`` and ``last.ckpt``, in place of the placeholder
      ``ModelCheckpoint()`` Lightning adds when the user gave none; a user's ``ModelCheckpoint`` (e.g.
      the one of a YAML config) is kept as it is;
    * :class:`LastCheckpointEveryNSteps` with ``checkpoint_every_n_steps`` (mid-epoch resume);
    * :class:`~focalnet_pl.ema.ModelEMA` with ``ema_decay`` (a configured ``ModelEMA`` takes its place);
    * ``LearningRateMonitor`` when a logger is present; :class:`SamplePredictionLogger` with
      ``log_samples``; :class:`RandomStateCheckpoint` (resumed runs continue the same random stream).

    Checkpoints go to ``<log dir>/checkpoints`` (Lightning's default); keep the logger version fixed
    (e.g. ``--trainer.logger.init_args.version``) for ``--ckpt_path last`` to find them on restart.
    """
    present = {type(callback) for callback in trainer.callbacks}
    callbacks: list[Callback] = []
    checkpoints = trainer.checkpoint_callbacks
    if checkpoints and all(is_lightning_default_checkpoint(c) for c in checkpoints):
        # replace Lightning's placeholder here rather than through configure_callbacks' override,
        # which would announce that it overrides callbacks the user never passed
        trainer.callbacks = [c for c in trainer.callbacks if c not in checkpoints]
        callbacks.append(ModelCheckpoint(
            monitor=monitor, mode=mode, save_last=True, auto_insert_metric_name=False,
            filename="epoch{epoch:03d}-" + monitor.replace("/", "_") + "{" + monitor + ":.4f}",
            enable_version_counter=False,  # shares last.ckpt with LastCheckpointEveryNSteps
        ))
    if checkpoint_every_n_steps and checkpoints and LastCheckpointEveryNSteps not in present:
        callbacks.append(LastCheckpointEveryNSteps(checkpoint_every_n_steps))
    if ema_decay is not None and not any(isinstance(c, ModelEMA) for c in trainer.callbacks):
        callbacks.append(ModelEMA(decay=ema_decay))
    if trainer.loggers and LearningRateMonitor not in present:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if log_samples and SamplePredictionLogger not in present:
        callbacks.append(SamplePredictionLogger(log_samples))
    if RandomStateCheckpoint not in present:
        callbacks.append(RandomStateCheckpoint())
    return callbacks


class LastCheckpointEveryNSteps(Callback):
    """Writes ``last.ckpt`` in the folder of the trainer's (first) ``ModelCheckpoint`` every
    ``every_n_steps`` optimizer steps, so that ``--ckpt_path last`` resumes mid-epoch.

    Not a ``ModelCheckpoint`` itself: one returned by ``configure_callbacks`` would replace the user's.
    """

    def __init__(self, every_n_steps: int) -> None:
        if every_n_steps < 1:
            raise ValueError(f"checkpoint_every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._saved_step:
            return
        self._saved_step = step
        trainer.save_checkpoint(os.path.join(trainer.checkpoint_callback.dirpath, "last.ckpt"))


class RandomStateCheckpoint(Callback):
    """Saves the torch, CUDA, numpy and ``random`` generator states with every checkpoint and restores
    them just before the first training batch of a resumed run, so that dropout, drop path and
    mixup draw what the uninterrupted run would have drawn. (The data side seeds its own draws:
    :mod:`datamodules.loading`.)"""

    def __init__(self) -> None:
        self._to_restore: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        name, keys, position, has_gauss, gauss = np.random.get_state()
        state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), position, has_gauss, gauss],
                 "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._to_restore = state_dict

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._to_restore is not None:
            _set_random_state(self._to_restore)
            self._to_restore = None


def _set_random_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class SamplePredictionLogger(Callback):
    """Sends a few validation images with the model's predictions drawn on them to TensorBoard.

    Works with any task that implements ``visualize_batch(batch, max_images) -> [(tag, HWC uint8 array)]``:
    the first validation batch of each validation run is kept and drawn at the end of validation.
    """

    def __init__(self, max_images: int = 8) -> None:
        self.max_images = max_images
        self._batch = None

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int,
                                dataloader_idx: int = 0) -> None:
        if batch_idx == 0 and dataloader_idx == 0 and not trainer.sanity_checking:
            self._batch = batch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        batch, self._batch = self._batch, None
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if batch is None or not writers or not trainer.is_global_zero or not hasattr(pl_module, "visualize_batch"):
            return
        for tag, picture in pl_module.visualize_batch(batch, self.max_images):
            for writer in writers:
                writer.add_image(tag, picture, global_step=trainer.global_step, dataformats="HWC")

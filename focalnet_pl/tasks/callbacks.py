"""Callbacks every task adds by default (via ``LightningModule.configure_callbacks``)."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from focalnet_pl.reliability import ReliabilityCallback


def default_task_callbacks(trainer: L.Trainer, monitor: str, mode: str = "max",
                           checkpoint_every_n_steps: int | None = None) -> list[Callback]:
    """The callbacks of every task.

    * ``ModelCheckpoint`` on the task metric (best + ``last.ckpt``);
    * with ``checkpoint_every_n_steps``, a second ``ModelCheckpoint`` refreshing ``last.ckpt`` every
      that many optimizer steps (mid-epoch resume with ``--ckpt_path last``);
    * ``LearningRateMonitor`` when a logger is present;
    * :class:`~focalnet_pl.reliability.ReliabilityCallback`: atomic checkpoint writes, ``weights_only``
      loads, resumable training order, sample loading errors named in the main process.

    Checkpoints go to ``<log dir>/checkpoints`` (Lightning's default); keep the logger version fixed
    (e.g. ``--trainer.logger.init_args.version``) for ``--ckpt_path last`` to find them on restart.
    """
    callbacks: list[Callback] = [ReliabilityCallback()]
    if trainer.checkpoint_callbacks:
        # with two writers of last.ckpt, the version counter would make them write last.ckpt and last-v1.ckpt
        share_last = bool(checkpoint_every_n_steps)
        callbacks.append(ModelCheckpoint(
            monitor=monitor, mode=mode, save_last=True, auto_insert_metric_name=False,
            filename="epoch{epoch:03d}-" + monitor.replace("/", "_") + "{" + monitor + ":.4f}",
            enable_version_counter=not share_last,
        ))
        if checkpoint_every_n_steps:
            callbacks.append(ModelCheckpoint(save_top_k=0, save_last=True, every_n_train_steps=checkpoint_every_n_steps,
                                             enable_version_counter=False))
    if trainer.loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks


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

"""Callbacks every task adds by default (via ``LightningModule.configure_callbacks``)."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint


def default_task_callbacks(trainer: L.Trainer, monitor: str, mode: str = "max") -> list[Callback]:
    """``ModelCheckpoint`` on the task metric (best + ``last.ckpt``) and ``LearningRateMonitor``.

    Each is added only where the trainer can use it: checkpointing enabled, a logger present.
    """
    callbacks: list[Callback] = []
    if trainer.checkpoint_callbacks:
        callbacks.append(ModelCheckpoint(
            monitor=monitor, mode=mode, save_last=True, auto_insert_metric_name=False,
            filename="epoch{epoch:03d}-" + monitor.replace("/", "_") + "{" + monitor + ":.4f}",
        ))
    if trainer.loggers:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks

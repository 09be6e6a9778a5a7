"""Fault tolerance shared by every task: atomic checkpoints and the non-finite loss guard.

* :class:`AtomicCheckpointIO` (a Lightning ``CheckpointIO`` plugin; the CLI gives it to every Trainer)
  writes checkpoints to a temporary file in the target folder, fsyncs it and renames it over the
  target, so a kill while saving never leaves a truncated ``last.ckpt``; it reads checkpoints with
  ``torch.load(weights_only=True)`` and refuses pickles that would run code (both by :mod:`focalnet_pl.io`).
* :class:`NonFiniteLossGuard` stops (or skips the step) on a NaN/Inf loss, naming the step and the
  loss terms.

The data side (sample errors named in the main process, a training order that resumes mid-epoch)
lives with the datamodules: :mod:`datamodules.loading`.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any, Literal

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

from focalnet_pl.io import CheckpointError, atomic_torch_save, load_checkpoint, reading_checkpoint

log = logging.getLogger(__name__)

NonFiniteAction = Literal["raise", "skip"]


# --------------------------------------------------------------------------------------------
# checkpoint IO
# --------------------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic local saves, ``weights_only=True`` loads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options, got {storage_options!r}")
        if "://" in str(path) and not str(path).startswith("file://"):
            super().save_checkpoint(checkpoint, path)  # remote filesystems: fsspec's transaction
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))

    def load_checkpoint(self, path: str | os.PathLike, map_location: Any = None, weights_only: bool | None = None) -> dict:
        if weights_only is False:
            raise CheckpointError("focalnet-pl loads checkpoints with weights_only=True only")
        fs = get_filesystem(path)
        if not fs.exists(path):
            raise CheckpointError(f"Checkpoint file not found: {path}")
        if "://" in str(path) and not str(path).startswith("file://"):
            with reading_checkpoint(path):
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return load_checkpoint(str(path).removeprefix("file://"), map_location="cpu" if map_location is None else map_location)


# --------------------------------------------------------------------------------------------
# non-finite loss
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class NonFiniteLossGuard:
    """Check a training loss: return it when finite; otherwise raise or (``action="skip"``) return ``None``.

    A ``training_step`` that returns ``None`` makes Lightning skip backward and the optimizer step.
    Skipping stops with an error after ``max_consecutive_skips`` non-finite steps in a row. With DDP,
    skipping on one rank only would desynchronise the ranks: use ``"raise"`` there.
    """

    def __init__(self, action: NonFiniteAction = "raise", max_consecutive_skips: int = 20) -> None:
        if action not in ("raise", "skip"):
            raise ValueError(f"non-finite loss action must be 'raise' or 'skip', got {action!r}")
        self.action = action
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped_steps = 0
        self._consecutive = 0

    def __call__(self, loss: torch.Tensor, terms: Mapping[str, torch.Tensor | float] | None = None,
                 step: int | None = None, epoch: int | None = None) -> torch.Tensor | None:
        if bool(torch.isfinite(loss.detach()).all()):
            self._consecutive = 0
            return loss
        message = describe_nonfinite(loss, terms, step, epoch)
        if self.action == "raise":
            raise NonFiniteLossError(message + " (set the task's on_nonfinite_loss: skip to skip such steps)")
        self.skipped_steps += 1
        self._consecutive += 1
        if self._consecutive > self.max_consecutive_skips:
            raise NonFiniteLossError(f"{message}; {self._consecutive} consecutive non-finite steps, giving up")
        log.warning("%s: skipping this optimizer step (%d skipped so far)", message, self.skipped_steps)
        return None


def describe_nonfinite(loss: torch.Tensor, terms: Mapping[str, torch.Tensor | float] | None,
                       step: int | None, epoch: int | None) -> str:
    """``"Non-finite loss nan at global step 12 (epoch 0): loss_ce=nan [non-finite], loss_box=0.31"``."""
    where = f" at global step {step}" if step is not None else ""
    where += f" (epoch {epoch})" if epoch is not None else ""
    parts = []
    for name, value in (terms or {}).items():
        value = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
        shown = value.item() if value.numel() == 1 else f"tensor{tuple(value.shape)}"
        flag = "" if bool(torch.isfinite(value).all()) else " [non-finite]"
        parts.append(f"{name}={shown}{flag}")
    total = loss.detach().float()
    total = total.item() if total.numel() == 1 else f"tensor{tuple(total.shape)}"
    return f"Non-finite loss {total}{where}" + (f": {', '.join(parts)}" if parts else "")

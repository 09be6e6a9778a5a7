"""Exponential moving average (EMA) of a model's weights, for every task: :class:`ModelEMA`.

Turn it on with a task's ``ema_decay`` argument (the task then adds ``ModelEMA(decay=ema_decay)``
to the trainer's callbacks) or by listing ``focalnet_pl.ema.ModelEMA`` under ``trainer.callbacks``
(for the warm-up or update interval; a configured one takes the place of the task's).

While fitting, validation runs with the EMA weights; when fitting ends the model keeps them, so a
``trainer.test/validate/predict`` in the same process uses them too. Every checkpoint written during
fit holds the EMA weights as its ``state_dict`` (what ``test``, ``predict``, ``export``, ``weights=``
fine-tuning and consolidation read) and the trained weights under :data:`TRAINED_STATE_KEY`, from
which a resumed fit continues (the EMA state is restored exactly).
"""
from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

log = logging.getLogger(__name__)

#: checkpoint entry holding the trained (not averaged) weights; ``state_dict`` holds the EMA weights
TRAINED_STATE_KEY = "current_model_state"


class ModelEMA(Callback):
    """Keeps an exponential moving average of the LightningModule's parameters and floating-point buffers.

    After every optimizer step ``k`` (1, 2, ...): ``ema = decay_k * ema + (1 - decay_k) * weights``, starting
    from the weights the fit starts with; integer buffers are copied. ``decay_k = decay``, or with
    ``warmup_power`` (timm's ``ModelEmaV3`` warm-up) ``min(decay, 1 - (1 + k) ** -warmup_power)``
    so that early, still-random weights fade out quickly (2/3 suits long runs, 3/4 short ones).

    Args:
        decay: the EMA decay per update (e.g. 0.9999; ``1 - 1/decay`` updates is the averaging horizon).
        warmup_power: the decay warm-up exponent; ``None``: no warm-up.
        update_every_n_steps: update after every that many optimizer steps (``decay`` applies per update).
    """

    def __init__(self, decay: float = 0.9999, warmup_power: float | None = None, update_every_n_steps: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA: decay must be in [0, 1), got {decay}")
        if warmup_power is not None and warmup_power <= 0:
            raise ValueError(f"ModelEMA: warmup_power must be > 0, got {warmup_power}")
        if update_every_n_steps < 1:
            raise ValueError(f"ModelEMA: update_every_n_steps must be >= 1, got {update_every_n_steps}")
        self.decay = decay
        self.warmup_power = warmup_power
        self.update_every_n_steps = update_every_n_steps
        self.updates = 0  # EMA updates done so far
        self._updated_at_step = 0  # trainer.global_step of the latest update
        self._names: list[str] = []  # state_dict keys of the averaged tensors
        self._averages: list[torch.Tensor] = []  # EMA tensors, in the order of ``_names``
        self._restored: dict[str, torch.Tensor] | None = None  # EMA read from a checkpoint, until on_fit_start
        self._swapped = False  # the module holds the EMA weights (validation) and ``_averages`` the trained ones

    @property
    def active(self) -> bool:
        """Whether an average is being kept (during fit)."""
        return bool(self._averages)

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update (1-based)."""
        if self.warmup_power is None:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + update) ** -self.warmup_power)

    def averaged_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA tensors by ``state_dict`` key (views of the running average)."""
        return dict(zip(self._names, self._averages))

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING and isinstance(trainer.strategy, ModelParallelStrategy):
            raise ValueError(
                "ModelEMA (ema_decay) does not support FSDP2 / ModelParallelStrategy (sharded parameters) yet: "
                "turn EMA off or train with DDP"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the average from the weights fit starts with (or the checkpoint's EMA on resume)."""
        tensors = _tracked_tensors(pl_module)
        self._names = list(tensors)
        with torch.no_grad():
            self._averages = [t.detach().clone() for t in tensors.values()]
            if self._restored is not None:
                missing = sorted(set(self._names) - set(self._restored))
                if missing:
                    raise KeyError(f"ModelEMA: the checkpoint's EMA weights lack {len(missing)} tensors, e.g. {missing[:5]}")
                for name, average in zip(self._names, self._averages):
                    average.copy_(self._restored[name])
        if self._restored is None:  # a new average (not resumed)
            self.updates, self._updated_at_step = 0, 0
        self._restored = None
        self._swapped = False

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._catch_up(trainer, pl_module)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.active and not self._swapped:
            self._swap(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after on_validation_epoch_end, so that metrics and drawn samples all come from the EMA weights
        if self._swapped:
            self._swap(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The model keeps the EMA weights for whatever follows fit."""
        if not self.active:
            return
        if not self._swapped:
            self._swap(pl_module)
        self._names, self._averages, self._swapped = [], [], False

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"updates": self.updates, "updated_at_step": self._updated_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.updates = int(state_dict["updates"])
        self._updated_at_step = int(state_dict["updated_at_step"])

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """``state_dict``: the EMA weights; :data:`TRAINED_STATE_KEY`: the trained ones (fit only)."""
        if not self.active:
            return
        if not self._swapped:
            self._catch_up(trainer, pl_module)  # a checkpoint written at a step holds that step's average
        stored = self.averaged_state_dict()
        # every state_dict key of a tracked tensor (tied weights have several) -> the stored tensor
        stored = {key: stored[first] for key, first in _state_dict_aliases(pl_module).items() if first in stored}
        module_state = checkpoint["state_dict"]
        swapped = {**module_state, **{k: v for k, v in stored.items() if k in module_state}}
        # the module holds the trained weights and ``_averages`` the EMA ones, or the reverse during validation
        trained, averaged = (swapped, module_state) if self._swapped else (module_state, swapped)
        checkpoint[TRAINED_STATE_KEY] = dict(trained)
        checkpoint["state_dict"] = dict(averaged)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit: the module gets the trained weights back and the EMA the checkpoint's average.

        (Lightning has loaded ``state_dict``, the EMA weights, into the module already; outside fit
        they stay there. A checkpoint written without EMA starts the average from its weights.)
        """
        if trainer.state.fn != TrainerFn.FITTING or TRAINED_STATE_KEY not in checkpoint:
            return
        averaged = {name: t.detach().clone() for name, t in _tracked_tensors(pl_module).items()}
        pl_module.load_state_dict(checkpoint[TRAINED_STATE_KEY], strict=pl_module.strict_loading)
        self._restored = averaged
        if self.active:  # the average exists already: take the checkpoint's
            self.on_fit_start(trainer, pl_module)

    # ------------------------------------------------------------------ internals
    def _catch_up(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Update once per optimizer step not yet averaged (every ``update_every_n_steps``)."""
        step = trainer.global_step
        if not self.active or step <= self._updated_at_step or step % self.update_every_n_steps:
            return
        self.updates += 1
        self._updated_at_step = step
        weight = 1.0 - self.decay_at(self.updates)
        tensors = _tracked_tensors(pl_module)
        with torch.no_grad():
            floats = [(a, tensors[n].detach()) for n, a in zip(self._names, self._averages) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [t for _, t in floats], weight)
            for name, average in zip(self._names, self._averages):
                if not average.is_floating_point():
                    average.copy_(tensors[name])

    def _swap(self, pl_module: L.LightningModule) -> None:
        """Exchange the module's weights and the stored ones (EMA <-> trained)."""
        tensors = _tracked_tensors(pl_module)
        with torch.no_grad():
            for name, stored in zip(self._names, self._averages):
                current = tensors[name].detach()
                held = current.clone()
                current.copy_(stored)
                stored.copy_(held)
        self._swapped = not self._swapped


def continue_from_trained_weights(trainer: L.Trainer | None, checkpoint: dict[str, Any]) -> None:
    """For a task's ``on_load_checkpoint``: a fit resumed without :class:`ModelEMA` from a checkpoint
    written with it continues from the trained weights, not from the average."""
    if (trainer is None or trainer.state.fn != TrainerFn.FITTING or TRAINED_STATE_KEY not in checkpoint
            or any(isinstance(c, ModelEMA) for c in trainer.callbacks)):
        return
    log.info("The checkpoint holds EMA weights but EMA is off: training continues from its trained weights")
    checkpoint["state_dict"] = checkpoint.pop(TRAINED_STATE_KEY)


def _state_dict_aliases(module: nn.Module) -> dict[str, str]:
    """``state_dict`` key of each parameter and persistent buffer -> the first key of the same tensor
    (tied weights appear under several keys)."""
    owned = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
    first: dict[int, str] = {}
    return {name: first.setdefault(id(t), name) for name, t in module.state_dict(keep_vars=True).items() if id(t) in owned}


def _tracked_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and persistent buffers by ``state_dict`` key, each tensor once."""
    state = module.state_dict(keep_vars=True)
    return {name: state[name] for name, first in _state_dict_aliases(module).items() if name == first}

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
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

log = logging.getLogger(__name__)

#: checkpoint entry holding the trained (not averaged) weights; ``state_dict`` holds the EMA weights
TRAINED_STATE_KEY = "current_model_state"
#: checkpoint entry holding the EMA's update count and the step of its latest update
EMA_STATE_KEY = "model_ema"


class ModelEMA(Callback):
    """Keeps an exponential moving average of the LightningModule's parameters and floating-point buffers.

    After every optimizer step ``k`` (1, 2, ...): ``ema = decay_k * ema + (1 - decay_k) * weights``, starting
    from the weights the fit starts with; integer buffers are copied. ``decay_k = decay``, or with
    ``warmup_power`` (timm's ``ModelEmaV3`` warm-up) ``min(decay, 1 - (1 + k) ** -warmup_power)``
    so that early, still-random weights fade out quickly (2/3 suits long runs, 3/4 short ones).
    Sharded training (FSDP / FSDP2) is not supported.

    Args:
        decay: the EMA decay per update (e.g. 0.9999; ``1 / (1 - decay)`` updates is the averaging horizon).
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
        self._weights: list[torch.Tensor] = []  # the module's tensors under those keys
        self._averages: list[torch.Tensor] = []  # their EMA, in the same order
        self._restored: dict[str, torch.Tensor] | None = None  # EMA read from a checkpoint, until on_fit_start
        self._swapped = False  # the module holds the EMA weights (validation, after fit), ``_averages`` the trained

    @property
    def active(self) -> bool:
        """Whether an average is kept (from the start of fit on)."""
        return bool(self._averages)

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update (1-based)."""
        if self.warmup_power is None:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + update) ** -self.warmup_power)

    # ------------------------------------------------------------------ lifecycle
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING and isinstance(trainer.strategy, (ModelParallelStrategy, FSDPStrategy)):
            raise ValueError(
                f"ModelEMA (ema_decay) does not support sharded parameters ({type(trainer.strategy).__name__}): "
                "turn EMA off or train with DDP"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the average from the weights fit starts with (the checkpoint's average on resume)."""
        tensors = _tracked_tensors(pl_module)
        self._names, self._weights = list(tensors), [t.detach() for t in tensors.values()]
        with torch.no_grad():
            self._averages = [t.clone() for t in self._weights]
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
        self._catch_up(trainer)

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self.active and not self._swapped:
            self._swap()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after on_validation_epoch_end, so that metrics and drawn samples all come from the EMA weights
        if trainer.state.fn == TrainerFn.FITTING and self._swapped:
            self._swap()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The model keeps the EMA weights for whatever follows fit (checkpoints written from now on, e.g.
        ``ModelCheckpoint``'s last one, still hold both)."""
        if self.active and not self._swapped:
            self._swap()

    # ---------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """``state_dict``: the EMA weights; :data:`TRAINED_STATE_KEY`: the trained ones; :data:`EMA_STATE_KEY`: the
        update count (written here, after the catch-up, rather than through ``state_dict()``, which Lightning
        collects first)."""
        if not self.active:
            return
        if not self._swapped:
            self._catch_up(trainer)  # a checkpoint written at a step holds that step's average
        stored = dict(zip(self._names, self._averages))
        module_state = checkpoint["state_dict"]
        # every state_dict key of an averaged tensor (tied weights have several) -> the stored tensor
        exchanged = dict(module_state)
        exchanged.update({key: stored[first] for key, first in _state_dict_aliases(pl_module).items()
                          if first in stored and key in module_state})
        # the module holds the trained weights and ``_averages`` the EMA ones, or the reverse during validation
        trained, averaged = (exchanged, module_state) if self._swapped else (module_state, exchanged)
        checkpoint[TRAINED_STATE_KEY] = dict(trained)
        checkpoint["state_dict"] = dict(averaged)
        checkpoint[EMA_STATE_KEY] = {"updates": self.updates, "updated_at_step": self._updated_at_step}

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Resuming a fit: the module gets the trained weights back and the EMA the checkpoint's average.

        (Lightning has loaded ``state_dict``, the EMA weights, into the module already; outside fit
        they stay there. A checkpoint written without EMA starts the average from its weights.)
        """
        if trainer.state.fn != TrainerFn.FITTING or TRAINED_STATE_KEY not in checkpoint:
            return
        self._restored = {name: t.detach().clone() for name, t in _tracked_tensors(pl_module).items()}
        pl_module.load_state_dict(checkpoint[TRAINED_STATE_KEY], strict=pl_module.strict_loading)
        # (Lightning's EMAWeightAveraging writes the same two weight entries, but no update count)
        state = checkpoint.get(EMA_STATE_KEY, {})
        self.updates = int(state.get("updates", 0))
        self._updated_at_step = int(state.get("updated_at_step", checkpoint.get("global_step", 0)))

    # ------------------------------------------------------------------ internals
    def _catch_up(self, trainer: L.Trainer) -> None:
        """Update once per optimizer step not yet averaged (every ``update_every_n_steps``)."""
        step = trainer.global_step
        if not self.active or step <= self._updated_at_step or step % self.update_every_n_steps:
            return
        self.updates += 1
        self._updated_at_step = step
        weight = 1.0 - self.decay_at(self.updates)
        with torch.no_grad():
            floats = [(a, w) for a, w in zip(self._averages, self._weights) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [w for _, w in floats], weight)
            for average, weights in zip(self._averages, self._weights):
                if not average.is_floating_point():
                    average.copy_(weights)

    def _swap(self) -> None:
        """Exchange the module's weights and the stored ones (EMA <-> trained)."""
        with torch.no_grad():
            for weights, stored in zip(self._weights, self._averages):
                held = weights.clone()
                weights.copy_(stored)
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

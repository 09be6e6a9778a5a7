"""Fault tolerance shared by every task: atomic checkpoints, resumable data order, loss and data guards.

* :class:`AtomicCheckpointIO` writes checkpoints to a temporary file in the target folder, fsyncs
  it and renames it over the target, so a kill while saving never leaves a truncated ``last.ckpt``;
  it reads checkpoints with ``torch.load(weights_only=True)`` and refuses pickles that would run code.
* :class:`ResumableSampler` + :class:`ResumableDataLoader`: the training order is a pure function of
  ``(seed, epoch)`` and every sample's augmentation of ``(seed, epoch, index)``, and the loader's
  state (epoch, batches consumed) is saved in the checkpoint, so a run resumed from a mid-epoch
  checkpoint sees exactly the batches the uninterrupted run would have seen.
* :class:`GuardedDataset` + :class:`GuardedCollate` turn an exception raised while loading a sample
  (in a worker or not) into a :class:`DataLoadError` raised in the main process that names the
  loader, the sample index and the file, instead of a worker traceback.
* :class:`NonFiniteLossGuard` stops (or skips the step) on a NaN/Inf loss, naming the step and the
  loss terms.
* :class:`ReliabilityCallback` installs all of the above around a datamodule's loaders; tasks add it
  by default through :func:`focalnet_pl.tasks.callbacks.default_task_callbacks`.
"""
from __future__ import annotations

import logging
import math
import os
import pickle
import random
import zlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    DistributedSampler,
    RandomSampler,
    SequentialSampler,
    default_collate,
)

from focalnet_pl.weights import CheckpointError

log = logging.getLogger(__name__)

NonFiniteAction = Literal["raise", "skip"]
_LOADER_HOOKS = ("train_dataloader", "val_dataloader", "test_dataloader", "predict_dataloader")


# --------------------------------------------------------------------------------------------
# checkpoint IO
# --------------------------------------------------------------------------------------------
def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with clear errors for code-running pickles and corrupt files."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refused to load {path}: it contains pickled objects other than tensors and plain containers "
            f"(loading it would run code). Only checkpoints of weights and plain values are accepted. Details: {err}"
        ) from err
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise CheckpointError(f"Checkpoint file not found: {path}") from err
        raise CheckpointError(f"Cannot read checkpoint {path} (truncated, corrupt or not a torch file): {err}") from err


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
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return safe_torch_load(str(path).removeprefix("file://"), map_location="cpu" if map_location is None else map_location)


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


# --------------------------------------------------------------------------------------------
# data errors
# --------------------------------------------------------------------------------------------
class DataLoadError(RuntimeError):
    """A sample could not be loaded; the message names the loader, the index and the file."""


class SampleFailure:
    """What a :class:`GuardedDataset` returns instead of raising (picklable, crosses worker boundaries)."""

    def __init__(self, index: int, file: str | None, error: str) -> None:
        self.index, self.file, self.error = index, file, error

    def describe(self) -> str:
        where = f"sample {self.index}" + (f" (file {self.file})" if self.file else "")
        return f"{where}: {self.error}"


class FailedBatch:
    """A batch in which at least one sample failed to load (raised in the main process)."""

    def __init__(self, failures: list[SampleFailure]) -> None:
        self.failures = failures


def sample_file(dataset: Any, index: int) -> str | None:
    """Best-effort file name of ``dataset[index]`` (ImageFolder ``samples``, ``paths``, ``files``, ``describe``)."""
    describe = getattr(dataset, "describe_sample", None)
    if callable(describe):
        return str(describe(index))
    for attr in ("samples", "imgs", "paths", "files", "image_files"):
        items = getattr(dataset, attr, None)
        if isinstance(items, (list, tuple)) and 0 <= index < len(items):
            item = items[index]
            return str(item[0] if isinstance(item, (tuple, list)) else item)
    return None


class GuardedDataset(Dataset):
    """Wraps a map-style dataset: load errors become :class:`SampleFailure`; tuple indices are seeded.

    An index ``(epoch, i)`` (from :class:`ResumableSampler`) loads ``dataset[i]`` with the torch,
    numpy and ``random`` generators seeded from ``(seed, epoch, i)``, so random augmentation does not
    depend on worker count, worker assignment or where a run was resumed.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # expose the wrapped dataset's attributes (classes, ...)
        if name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        if isinstance(index, tuple):
            epoch, index = index
            return self._seeded(index, zlib.crc32(f"{self.seed}/{epoch}/{index}".encode()))
        return self._load(index)

    def _seeded(self, index: int, seed: int) -> Any:
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed)
            try:
                return self._load(index)
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)

    def _load(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as err:  # noqa: BLE001 - every failure is reported, with its type
            file = getattr(err, "path", None) or sample_file(self.dataset, index)
            return SampleFailure(index, None if file is None else str(file), f"{type(err).__name__}: {err}")


class GuardedCollate:
    """Collate function: a batch containing a :class:`SampleFailure` becomes a :class:`FailedBatch`."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None = None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, samples: list[Any]) -> Any:
        failures = [s for s in samples if isinstance(s, SampleFailure)]
        if failures:
            return FailedBatch(failures)
        return self.collate_fn(samples)


def raise_if_failed(batch: Any, loader_name: str, dataset: Any = None) -> None:
    """Raise :class:`DataLoadError` in the main process for a :class:`FailedBatch`."""
    if not isinstance(batch, FailedBatch):
        return
    what = f"{type(dataset).__name__} " if dataset is not None else ""
    root = getattr(dataset, "root", None)
    what += f"at {root} " if root is not None else ""
    details = "; ".join(f.describe() for f in batch.failures)
    raise DataLoadError(f"{loader_name}: failed to load {len(batch.failures)} sample(s) of {what}- {details}")


# --------------------------------------------------------------------------------------------
# resumable data order
# --------------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """Seeded (distributed) sampler yielding ``(epoch, index)`` that can start mid-epoch.

    The order of epoch ``e`` is ``randperm(n, seed + e)`` (as :class:`DistributedSampler`), so it does
    not depend on the global RNG; :meth:`skip_batches` makes the next iteration start after the
    batches already consumed. Being a ``DistributedSampler``, Lightning leaves it in place under DDP.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool = False) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)
        self._skip = 0

    def skip_samples(self, count: int) -> None:
        """Start the next iteration ``count`` samples into the epoch's order."""
        self._skip = count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self._skip:]  # evaluated now: set_epoch later does not change it
        self._skip = 0
        epoch = self.epoch
        return iter([(epoch, i) for i in indices])


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` whose position is saved in Lightning checkpoints.

    ``consumed_batches`` (set by :class:`ReliabilityCallback`) reports how many batches of the current
    epoch the training loop has finished; the loader's own iterator runs ahead (prefetching).
    """

    sampler: ResumableSampler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableDataLoader needs a ResumableSampler")
        self.consumed_batches: Callable[[], int] | None = None
        self._loaded_state: dict[str, int] | None = None

    def state_dict(self) -> dict[str, int]:
        consumed = self.consumed_batches() if self.consumed_batches is not None else 0
        return {"epoch": int(self.sampler.epoch), "consumed_batches": int(consumed), "seed": int(self.sampler.seed),
                "num_samples": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if dict(state) == self._loaded_state:  # loaded already (by ReliabilityCallback, then by Lightning)
            return
        self._loaded_state = dict(state)
        if state.get("num_samples") != len(self.dataset):
            log.warning("The training set has %d samples, the checkpoint's had %s: the data order cannot be "
                        "resumed exactly; starting the epoch over", len(self.dataset), state.get("num_samples"))
            return
        epoch, consumed = int(state["epoch"]), int(state["consumed_batches"])
        if consumed >= len(self):
            epoch, consumed = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip_samples(consumed * self.batch_size)
        log.info("Resuming the training data order at epoch %d, batch %d", epoch, consumed)


def guard_dataloader(loader: Any, loader_name: str, trainer: L.Trainer | None = None, resumable: bool = False,
                     seed: int = 0) -> Any:
    """``loader`` rebuilt with a :class:`GuardedDataset` (and, for training, a resumable sampler).

    Only plain ``torch.utils.data.DataLoader`` over a sized dataset with standard batching is
    rebuilt; anything else is returned unchanged (logged). The order is made resumable only for a
    random or sequential sampler; a custom sampler (e.g. repeat-factor sampling) is kept as it is.
    """
    if type(loader) is not DataLoader or not hasattr(loader.dataset, "__len__") \
            or not isinstance(loader.batch_sampler, BatchSampler) or type(loader.batch_sampler) is not BatchSampler:
        log.info("%s: %s is not a plain DataLoader with a sized dataset; loading errors are not wrapped",
                 loader_name, type(loader).__name__)
        return loader
    options = {
        "num_workers": loader.num_workers, "collate_fn": GuardedCollate(loader.collate_fn),
        "pin_memory": loader.pin_memory, "timeout": loader.timeout, "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context, "generator": loader.generator,
        "prefetch_factor": loader.prefetch_factor, "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    batch_size, drop_last = loader.batch_sampler.batch_size, loader.batch_sampler.drop_last
    if resumable and type(loader.sampler) not in (RandomSampler, SequentialSampler):
        log.info("%s: custom sampler %s kept; the data order is not resumable mid-epoch",
                 loader_name, type(loader.sampler).__name__)
        resumable = False
    if resumable:
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = ResumableSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                   num_replicas=world, rank=rank)
        return ResumableDataLoader(GuardedDataset(loader.dataset, seed), batch_size=batch_size, sampler=sampler,
                                   drop_last=drop_last, **options)
    return DataLoader(GuardedDataset(loader.dataset, seed), batch_size=batch_size, sampler=loader.sampler,
                      drop_last=drop_last, **options)


# --------------------------------------------------------------------------------------------
# the callback
# --------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ReliabilityCallback(Callback):
    """Atomic ``weights_only`` checkpoint IO, resumable training order, data errors named, RNG resumed.

    Args:
        seed: seed of the data order and per-sample augmentation (default: the ``seed_everything`` seed).
        resumable_data: rebuild the training loader with :class:`ResumableSampler`.
        guard_data: wrap every loader so that a sample that fails to load raises :class:`DataLoadError`.
        atomic_checkpoints: install :class:`AtomicCheckpointIO` unless another checkpoint IO was configured.
    """

    def __init__(self, seed: int | None = None, resumable_data: bool = True, guard_data: bool = True,
                 atomic_checkpoints: bool = True) -> None:
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0")) if seed is None else seed
        self.resumable_data = resumable_data
        self.guard_data = guard_data
        self.atomic_checkpoints = atomic_checkpoints
        self._rng_to_restore: dict[str, Any] | None = None
        self._train_loader_state: dict[str, int] | None = None
        self._train_loader: ResumableDataLoader | None = None
        self._datasets: dict[str, Any] = {}
        self._wrapped: list[tuple[L.LightningDataModule, str]] = []

    @property
    def state_key(self) -> str:
        return "ReliabilityCallback"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.atomic_checkpoints and type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        datamodule = trainer.datamodule
        if not self.guard_data or datamodule is None:
            return
        from lightning.pytorch.utilities.model_helpers import is_overridden

        for name in _LOADER_HOOKS:
            if getattr(vars(datamodule).get(name), "_focalnet_wrapped", False):
                del vars(datamodule)[name]  # left by a run that ended with an exception
            if name in vars(datamodule) or not is_overridden(name, datamodule, L.LightningDataModule):
                continue  # not defined by this datamodule's class
            setattr(datamodule, name, self._wrap_hook(getattr(datamodule, name), name, trainer))
            self._wrapped.append((datamodule, name))

    def _unwrap(self) -> None:
        """Back to the datamodule's own methods (keeps it picklable, e.g. for a later ddp_spawn run)."""
        for datamodule, name in self._wrapped:
            vars(datamodule).pop(name, None)
        self._wrapped.clear()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._unwrap()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._unwrap()

    def _wrap_hook(self, hook: Callable[[], Any], name: str, trainer: L.Trainer) -> Callable[[], Any]:
        def guarded_hook() -> Any:
            loader = hook()
            if not isinstance(loader, DataLoader):
                return loader
            self._datasets[name] = loader.dataset
            guarded = guard_dataloader(loader, name, trainer, resumable=self.resumable_data and name == "train_dataloader",
                                       seed=self.seed)
            if isinstance(guarded, ResumableDataLoader):
                guarded.consumed_batches = lambda: _consumed_train_batches(trainer)
                # Lightning restores loader states only when the loader is created after the loops are
                # restored, which is not the case when configure_optimizers asks for
                # estimated_stepping_batches: restore it here, before any iterator exists.
                if self._train_loader_state is not None:
                    guarded.load_state_dict(self._train_loader_state)
                    self._train_loader_state = None
                self._train_loader = guarded
            return guarded

        guarded_hook._focalnet_wrapped = True  # type: ignore[attr-defined]
        return guarded_hook

    # -- data errors: raised in the main process before the step sees the batch
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._rng_to_restore is not None:
            _set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        raise_if_failed(batch, f"train_dataloader batch {batch_idx}", self._datasets.get("train_dataloader"))

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        raise_if_failed(batch, f"val_dataloader batch {batch_idx}", self._datasets.get("val_dataloader"))

    def on_test_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        raise_if_failed(batch, f"test_dataloader batch {batch_idx}", self._datasets.get("test_dataloader"))

    def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        raise_if_failed(batch, f"predict_dataloader batch {batch_idx}", self._datasets.get("predict_dataloader"))

    # -- RNG and data position: saved with every checkpoint, restored on resume
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": _rng_state()}
        if self._train_loader is not None:
            state["train_loader"] = self._train_loader.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._rng_to_restore = state_dict.get("rng")
        self._train_loader_state = state_dict.get("train_loader")


def _consumed_train_batches(trainer: L.Trainer) -> int:
    """Training batches of the current epoch whose step has run (read while a checkpoint is saved)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress.current
    consumed = progress.processed
    return int(consumed) if math.isfinite(consumed) else 0

"""The loaders every datamodule serves: sample errors named in the main process, a training order
that resumes mid-epoch.

* :class:`GuardedDataset` + :class:`GuardedCollate`: an exception raised while loading a sample (in a
  worker or not) travels to the main process as a :class:`FailedBatch`, where :class:`GuardedLoader`
  raises a :class:`DataLoadError` naming the loader, the batch, the sample index and the file.
* :class:`ResumableSampler`: the training order of epoch ``e`` is a function of ``(seed, e)`` and each
  sample is loaded under a seed of its own, ``(seed, e, index)``; the sampler's position is part of
  the state of the :class:`GuardedLoader` (torchdata's ``StatefulDataLoader``), which Lightning saves
  in the checkpoint and restores on resume, so a resumed run sees the batches an uninterrupted run
  would have seen.
* :class:`ResumableDataModule`: the base of the datamodules; it builds these loaders and also keeps
  the training loader's position in its own state (see :meth:`ResumableDataModule.load_state_dict`).
"""
from __future__ import annotations

import logging
import os
import random
import warnings
import zlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader

__all__ = [
    "DataLoadError", "FailedBatch", "GuardedCollate", "GuardedDataset", "GuardedLoader", "ResumableDataModule",
    "ResumableSampler", "SampleFailure", "raise_if_failed", "sample_random_state",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# sample errors
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
    """A batch in which at least one sample failed to load."""

    def __init__(self, failures: list[SampleFailure]) -> None:
        self.failures = failures


def sample_file(dataset: Any, index: int) -> str | None:
    """Best-effort file name of ``dataset[index]`` (``describe_sample``, ImageFolder ``samples``, ``paths``, ...)."""
    describe = getattr(dataset, "describe_sample", None)
    if callable(describe):
        return str(describe(index))
    for attr in ("samples", "imgs", "paths", "files", "image_files", "records"):
        items = getattr(dataset, attr, None)
        if isinstance(items, (list, tuple)) and 0 <= index < len(items):
            item = items[index]
            if isinstance(item, Mapping):
                item = item.get("file_name")
            return None if item is None else str(item[0] if isinstance(item, (tuple, list)) else item)
    return None


def raise_if_failed(batch: Any, where: str, dataset: Any = None) -> None:
    """Raise :class:`DataLoadError` for a :class:`FailedBatch` (``where``: e.g. ``"train_dataloader batch 3"``)."""
    if not isinstance(batch, FailedBatch):
        return
    what = f"{type(dataset).__name__} " if dataset is not None else ""
    root = getattr(dataset, "root", None)
    what += f"at {root} " if root is not None else ""
    details = "; ".join(f.describe() for f in batch.failures)
    raise DataLoadError(f"{where}: failed to load {len(batch.failures)} sample(s) of {what}- {details}")


@contextmanager
def sample_random_state(seed: int) -> Iterator[None]:
    """Inside the block, ``torch``, ``numpy`` and ``random`` draw from ``seed``; their states are restored after.

    The random augmentations of torchvision and detectron2 take no generator argument: they draw
    from these process-wide generators, so this is the only way to give one sample a seed of its
    own. Restoring the states keeps the caller's stream (e.g. the model's dropout when a loader runs
    in the main process) untouched.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class GuardedDataset(Dataset):
    """Wraps a map-style dataset: a loading error becomes a :class:`SampleFailure`.

    An index ``(epoch, i)`` (from :class:`ResumableSampler`) loads ``dataset[i]`` under the seed of
    ``(seed, epoch, i)``, so its random augmentation depends neither on worker count or assignment
    nor on where a run was resumed. A plain index loads ``dataset[i]`` as it is.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:  # the wrapped dataset's attributes (classes, root, ...)
        if name in ("dataset", "seed"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int | tuple[int, int]) -> Any:
        if isinstance(index, tuple):
            epoch, index = index
            with sample_random_state(zlib.crc32(f"{self.seed}/{epoch}/{index}".encode())):
                return self._load(index)
        return self._load(index)

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


# --------------------------------------------------------------------------------------------
# resumable order
# --------------------------------------------------------------------------------------------
class ResumableSampler(DistributedSampler):
    """Seeded (distributed) sampler yielding ``(epoch, index)`` whose position is saved with its loader.

    The order of epoch ``e`` is ``DistributedSampler``'s (``randperm(n, seed + e)``), independent of the
    global RNG. :meth:`state_dict` (epoch and samples yielded in this pass) is stored by
    ``StatefulDataLoader`` in the loader's state; after :meth:`load_state_dict` the next pass starts
    where the saved one stopped, or at the next epoch when the saved one had served its last batch.
    Being a ``DistributedSampler``, Lightning leaves it in place under DDP.

    Args:
        samples_per_pass: samples the loader takes from a pass (fewer than ``len(self)`` when it drops
            an incomplete last batch); a position at or past it means the epoch is over.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 samples_per_pass: int | None = None) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.samples_per_pass = len(self) if samples_per_pass is None else samples_per_pass
        self.progress = (0, 0)  # (epoch, samples yielded) of the pass being served
        self._start = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return self._pass()  # lazy: a DataLoader iterator may call iter() more than once before it draws

    def _pass(self) -> Iterator[tuple[int, int]]:
        epoch, start, self._start = self.epoch, self._start, 0
        self.progress = (epoch, start)
        for position, index in enumerate(list(super().__iter__())[start:], start + 1):
            self.progress = (epoch, position)
            yield epoch, index

    def state_dict(self) -> dict[str, int]:
        epoch, position = self.progress
        return {"epoch": epoch, "position": position, "seed": int(self.seed), "num_samples": len(self.dataset)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        if state["num_samples"] != len(self.dataset):
            log.warning("The training set has %d samples, the checkpoint's had %d: the data order cannot be "
                        "resumed exactly; starting the epoch over", len(self.dataset), state["num_samples"])
            return
        epoch, position = int(state["epoch"]), int(state["position"])
        if position >= self.samples_per_pass:
            epoch, position = epoch + 1, 0
        self.set_epoch(epoch)
        self._start = position


# --------------------------------------------------------------------------------------------
# loaders and the datamodule base
# --------------------------------------------------------------------------------------------
class GuardedLoader(StatefulDataLoader):
    """``StatefulDataLoader`` over a :class:`GuardedDataset` that raises :class:`DataLoadError` in the
    main process for a batch with a sample that failed to load.

    Args:
        name: the loader's name in error messages (e.g. ``"train_dataloader"``).
        (the others: ``StatefulDataLoader``'s)
    """

    def __init__(self, dataset: Dataset, *args: Any, name: str = "dataloader", **kwargs: Any) -> None:
        with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in recent torch
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(dataset, *args, **kwargs)
        self.name = name
        self.started = False

    def __iter__(self) -> Iterator[Any]:
        self.started = True
        return self._checked(super().__iter__())

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume where ``state_dict`` stopped. A state saved with another number of workers (which
        ``StatefulDataLoader`` cannot restore) restores the :class:`ResumableSampler`'s position alone:
        the order and the augmentation do not depend on the workers."""
        main = state_dict.get("_snapshot", {}).get("_main_snapshot", state_dict)
        if main.get("_num_workers", 0) != self.num_workers and isinstance(self.sampler, ResumableSampler):
            super().load_state_dict({})  # a fresh iterator
            self.sampler.load_state_dict(main["_sampler_iter_state"]["sampler_state"])
            return
        super().load_state_dict(state_dict)

    def _checked(self, batches: Iterator[Any]) -> Iterator[Any]:
        dataset = getattr(self.dataset, "dataset", self.dataset)
        for index, batch in enumerate(batches):
            raise_if_failed(batch, f"{self.name} batch {index}", dataset)
            yield batch


def data_seed() -> int:
    """Seed of the training order and augmentation: ``seed_everything``'s (``PL_GLOBAL_SEED``), else 0."""
    return int(os.environ.get("PL_GLOBAL_SEED", "0"))


class ResumableDataModule(L.LightningDataModule):
    """Base of the datamodules: :meth:`loader` builds their loaders; the training one resumes mid-epoch.

    Lightning saves the training loader's state in the fit loop, but restores it only into a loader
    created after the checkpoint's loops were restored, which is too late when ``configure_optimizers``
    asks for ``trainer.estimated_stepping_batches`` (that creates the loader first). The datamodule
    therefore also keeps the position in its own state (saved and restored by Lightning before the
    loaders exist) and hands it to the training loader it creates. (Strategies that restore checkpoints
    after their setup, such as FSDP, restore it too late for that: a resumed epoch does not continue the
    saved order there.)
    """

    def __init__(self) -> None:
        super().__init__()
        self._train_loader: GuardedLoader | None = None
        self._train_loader_state: dict[str, Any] | None = None

    def loader(self, dataset: Dataset, name: str, batch_size: int, train: bool = False, drop_last: bool = False,
               collate_fn: Callable[[list[Any]], Any] | None = None, **options: Any) -> GuardedLoader:
        """A :class:`GuardedLoader` over ``dataset``; ``train``: shuffled by a :class:`ResumableSampler`.

        ``options``: further ``DataLoader`` arguments (``num_workers``, ``pin_memory``, ...).
        """
        seed = data_seed()
        sampler = None
        if train:
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
            sampler = ResumableSampler(dataset, shuffle=True, seed=seed, num_replicas=world, rank=rank)
            if drop_last:
                sampler.samples_per_pass = len(sampler) // batch_size * batch_size
        loader = GuardedLoader(GuardedDataset(dataset, seed), batch_size=batch_size, sampler=sampler,
                               drop_last=drop_last, collate_fn=GuardedCollate(collate_fn), name=name, **options)
        if train:
            if self._train_loader_state is not None:
                loader.load_state_dict(self._train_loader_state)
                self._train_loader_state = None
            self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        if self._train_loader is None or not self._train_loader.started:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_loader_state = state_dict.get("train_loader")

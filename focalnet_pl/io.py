"""Reading checkpoints without running code, and writing files atomically: the one place that does either.

* :func:`load_checkpoint`: the object stored in a ``.safetensors`` file, a detectron2 ``.pkl`` (numpy
  arrays, as the official Mask2Former releases), or a torch pickle read with ``weights_only=True`` and
  only the classes of :data:`SAFE_CHECKPOINT_GLOBALS` allowed besides tensors and plain containers.
  :func:`reading_checkpoint` gives the same errors around a read done elsewhere (Lightning's).
  Every failure is a :class:`CheckpointError` naming the file.
* :func:`atomic_write`: write through a temporary file in the target folder, fsync it and rename it over
  the target, so that a kill never leaves a truncated file; :func:`atomic_torch_save` and
  :func:`save_safetensors_file` on top.
"""
from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "SAFE_CHECKPOINT_GLOBALS",
    "CheckpointError",
    "atomic_torch_save",
    "atomic_write",
    "load_checkpoint",
    "reading_checkpoint",
    "save_safetensors_file",
]


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


#: Classes a checkpoint pickle may hold besides tensors and plain containers: the ``args``
#: (``argparse.Namespace``, plain attributes only) the official DINO ``main.py`` saves with its checkpoints.
SAFE_CHECKPOINT_GLOBALS: list[Any] = [argparse.Namespace]


@contextmanager
def reading_checkpoint(path: str | os.PathLike, allowed_globals: Sequence[Any] | None = None) -> Iterator[None]:
    """Around a ``torch.load(weights_only=True)`` of ``path``: allow ``allowed_globals`` (default
    :data:`SAFE_CHECKPOINT_GLOBALS`) and turn a refused, missing or unreadable file into a
    :class:`CheckpointError` that names it."""
    allowed = list(SAFE_CHECKPOINT_GLOBALS if allowed_globals is None else allowed_globals)
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        names = [getattr(g, "__qualname__", g) for g in allowed]
        raise CheckpointError(
            f"Refused to load {path}: it pickles objects other than tensors, plain containers and {names} "
            f"(loading it would run code). Only checkpoints of weights and plain values are accepted; re-save "
            f"it as a state dict or safetensors. Details: {err}"
        ) from err
    except FileNotFoundError as err:
        raise CheckpointError(f"Checkpoint file not found: {path}") from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read checkpoint {path} (truncated, corrupt or not a torch file): {err}") from err


def load_checkpoint(path: str | os.PathLike, allowed_globals: Sequence[Any] | None = None,
                    map_location: Any = "cpu") -> Any:
    """The object stored in the checkpoint file ``path``, read without running code.

    ``.safetensors``: its ``name -> tensor`` dict; ``.pkl``: a detectron2 pickle of numpy arrays (its
    dict, the ``model`` arrays as tensors); anything else: ``torch.load(weights_only=True)`` with
    ``allowed_globals`` (default :data:`SAFE_CHECKPOINT_GLOBALS`) allowed.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return _load_safetensors(path)
    if path.suffix == ".pkl":
        return _load_numpy_pickle(path)
    with reading_checkpoint(path, allowed_globals):
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointError(f"Cannot read safetensors file {path}: {err}") from err


class _NumpyArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only (detectron2 ``.pkl`` checkpoints); any other
    global, which could run code, is refused."""

    _ALLOWED = {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    } | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_numpy_pickle(path: Path) -> dict[str, Any]:
    """A detectron2 ``.pkl`` checkpoint (``{"model": {name: ndarray}, ...}``) with tensors for the arrays."""
    try:
        with path.open("rb") as handle:
            obj = _NumpyArrayUnpickler(handle, encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refused to load {path}: it pickles objects other than numpy arrays and plain containers "
            f"(loading it would run code). Details: {err}"
        ) from err
    except FileNotFoundError as err:
        raise CheckpointError(f"Checkpoint file not found: {path}") from err
    except (EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"Cannot read pickle checkpoint {path} (truncated or corrupt): {err}") from err
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a checkpoint dict (found {type(obj).__name__})")
    model = obj.get("model", obj)
    if isinstance(model, Mapping):
        model = {k: torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v for k, v in model.items()}
    return {**obj, "model": model}


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write(temporary_path)`` in ``path``'s folder, then fsync and rename it over ``path``; on any
    error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` through :func:`atomic_write`."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)

    return atomic_write(path, write)


def save_safetensors_file(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                          metadata: Mapping[str, str] | None = None) -> Path:
    """``tensors`` (contiguous, not sharing memory) as a safetensors file, through :func:`atomic_write`."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=dict(metadata or {})))

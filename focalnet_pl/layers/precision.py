"""Float32 islands in mixed-precision (bf16 / fp16 autocast) models.

The numerically sensitive parts (deformable-attention sampling locations and weights, losses and their
sums, matching costs, softmax / sigmoid of class logits in post-processing) run with autocast off on
float32 copies of their half-precision inputs. In a float32 model both steps are no-ops, so its results
are bitwise unchanged.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["autocast_off", "float32", "run_in_float32"]

F = TypeVar("F", bound=Callable[..., Any])


#: the dtypes :func:`float32` casts (float64 stays as it is)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def float32(value: Any) -> Any:
    """``value`` with every float16 / bfloat16 tensor in it (also inside lists, tuples and dicts) as float32."""
    if isinstance(value, Tensor):
        return value.float() if value.dtype in HALF_DTYPES else value
    if isinstance(value, dict):
        return {key: float32(item) for key, item in value.items()}
    if isinstance(value, list):
        return [float32(item) for item in value]
    if isinstance(value, tuple):
        items = [float32(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)  # named tuples too
    return value


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def autocast_off(device: torch.device | str) -> AbstractContextManager:
    """Autocast disabled for ``device``'s type (``cuda``, ``cpu``, ...); nothing at all when it is not on
    (traced / exported float32 graphs stay free of autocast regions)."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else nullcontext()


def run_in_float32(fn: F) -> F:
    """Decorate ``fn`` to run with autocast off (on the device type of its first tensor argument) and its
    float16 / bfloat16 tensor arguments, also those nested in lists, tuples and dicts, cast to float32."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        first = next(_tensors([args, kwargs]), None)
        if first is None:
            return fn(*args, **kwargs)
        with autocast_off(first.device):
            return fn(*float32(args), **float32(kwargs))

    return wrapper  # type: ignore[return-value]

"""What makes the host wait for the device during a training step, found on any machine (CPU included).

On a GPU the host runs ahead of the device, queueing kernels, until something needs a value the device
has not produced yet: reading a tensor's value (``item``, ``tolist``, ``cpu``, ``numpy``, ``bool`` of a
tensor in an ``if``) or an operation whose output size depends on the values (``nonzero``, boolean-mask
indexing, ``unique``, ...). Each such point drains the queue, and the device idles while the host catches
up. :class:`HostSyncAudit` records those calls with the line of this package that made them, so they
can be found and removed without a GPU. On CPU it cannot tell host tensors from device ones: it also
lists reads of tensors that would stay on the host (the data loader's targets, say).
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncAudit", "HostRead"]

_PACKAGE = str(Path(__file__).resolve().parent)
# Tensor methods / functions that read values back to the host
_READS = {"item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero",
          "masked_select", "unique", "unique_consecutive", "argwhere", "equal"}
# the aten ops behind value reads, for reads made inside other operators
_ATEN_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive",
               "equal", "is_nonzero"}


@dataclass(frozen=True)
class HostRead:
    """One kind of host read at one place: the file name, line and function of the innermost frame in
    ``focalnet_pl`` (or the innermost frame at all when the package is not on the stack)."""

    kind: str
    file: str
    line: int
    function: str
    in_package: bool = True

    @property
    def site(self) -> str:
        return f"{self.file}:{self.line} ({self.function})"


def _read(kind: str) -> HostRead:
    frames = [frame for frame in traceback.extract_stack() if frame.filename != __file__]
    ours = [frame for frame in frames if frame.filename.startswith(_PACKAGE)]
    frame = (ours or frames)[-1]
    return HostRead(kind, Path(frame.filename).name, frame.lineno or 0, frame.name, bool(ours))


@dataclass
class HostSyncAudit:
    """Context manager counting host reads of tensor values (see the module docstring).

    ``with HostSyncAudit() as audit: step()`` then ``audit.reads`` is a :class:`collections.Counter` of
    :class:`HostRead`; :meth:`table` formats it.
    """

    reads: Counter = field(default_factory=Counter)

    def __post_init__(self) -> None:
        audit = self

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                boolean_index = name == "__getitem__" and _has_boolean_tensor(args[1:])
                if name in _READS or boolean_index:
                    audit.reads[_read("boolean-mask index" if boolean_index else name)] += 1
                    audit._inside += 1
                    try:
                        return func(*args, **(kwargs or {}))
                    finally:
                        audit._inside -= 1
                return func(*args, **(kwargs or {}))

        class _Operators(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if not audit._inside and func.overloadpacket.__name__ in _ATEN_READS:
                    audit.reads[_read(f"aten.{func.overloadpacket.__name__}")] += 1
                return func(*args, **(kwargs or {}))

        self._inside = 0
        self._modes = (_Functions(), _Operators())

    def __enter__(self) -> HostSyncAudit:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.reads.values())

    @property
    def in_package(self) -> int:
        """Reads made (directly or through a library) by code of this package."""
        return sum(count for read, count in self.reads.items() if read.in_package)

    def table(self) -> str:
        """One line per kind and site, most frequent first."""
        return "\n".join(f"{count:>5}  {read.kind:<20} {read.site}" for read, count in self.reads.most_common())


def _has_boolean_tensor(indices) -> bool:
    items = indices[0] if len(indices) == 1 and isinstance(indices[0], tuple) else indices
    return any(isinstance(item, torch.Tensor) and item.dtype == torch.bool for item in items)

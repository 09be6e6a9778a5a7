"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``) through Lightning.

* :class:`FSDP2Strategy`: Lightning's ``ModelParallelStrategy`` with a pure data-parallel device mesh
  (every process holds one shard; no tensor parallelism) plus the sharding policy of this project:
  which module classes become FSDP units, activation checkpointing of those units, the mixed
  precision policy and the checkpoint layout (``sharded``: one distributed-checkpoint folder, or
  ``full``: one file gathered on rank 0).
* :func:`maybe_fully_shard`: called by a task's ``configure_model()``; shards the task's modules when
  the trainer runs a ``ModelParallelStrategy``, does nothing otherwise and never shards twice.
* :func:`end_process_group`: the clean end of a multi-process run (every rank reaches it, then the
  process group is destroyed), so no rank exits while another still talks to it.
* :func:`consolidate_checkpoint`: distributed checkpoint folder -> one Lightning checkpoint file that
  ``cli.py test/predict --ckpt_path``, ``Trainer(...).test(ckpt_path=...)`` and
  ``create_focalnet(weights=...)`` load (weights and training metadata; no optimizer state).
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from focalnet_pl.io import atomic_torch_save, load_checkpoint

log = logging.getLogger(__name__)

#: File of the distributed checkpoint folder that holds everything except weights and optimizer state.
LIGHTNING_METADATA_FILE = "meta.pt"
#: File that marks a folder as a ``torch.distributed.checkpoint`` checkpoint.
DCP_METADATA_FILE = ".metadata"

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
}


def _parse_dtype(name: str | None, key: str) -> torch.dtype | None:
    if name is None:
        return None
    try:
        return _DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"{key}={name!r} is not a dtype; use one of {sorted(_DTYPES)} or null") from None


@dataclass(frozen=True)
class ShardingPolicy:
    """How :func:`maybe_fully_shard` turns a module into FSDP2 units (see :class:`FSDP2Strategy`)."""

    block_types: tuple[str, ...] = ()
    activation_checkpointing: bool = False
    param_dtype: torch.dtype | None = None
    reduce_dtype: torch.dtype | None = None
    reshard_after_forward: bool = True
    cpu_offload: bool = False


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all processes of all nodes.

    Use it from YAML (``configs/strategy/fsdp.yaml``) with any task whose ``configure_model()`` calls
    :func:`maybe_fully_shard`. The data-parallel mesh spans ``num_nodes * devices`` processes, so
    ``--trainer.num_nodes`` and ``--trainer.devices`` are all it needs to scale.

    Args:
        block_types: class names (``FocalNetBlock``) or qualified names (``focalnet_pl.focalnet.FocalNetBlock``)
            of the modules that become FSDP units, in addition to the ones the task names itself. Each unit's
            parameters are gathered just before its forward/backward and freed right after.
        activation_checkpointing: recompute the activations of every unit in backward (composable
            ``torch.distributed._composable.checkpoint``: parameter names are unchanged).
        param_dtype: dtype in which gathered parameters compute (``bfloat16`` for mixed precision;
            ``null`` keeps float32). Sharded master weights and optimizer state stay float32.
        reduce_dtype: dtype of the gradient reduce-scatter (``float32`` keeps reductions exact).
        reshard_after_forward: free gathered parameters after forward (ZeRO-3); ``false`` keeps them until
            backward (ZeRO-2-like: faster, more memory).
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory (slow; last resort).
        state_dict_type: ``sharded``: every rank writes its shard into a checkpoint folder (fast, resumable
            with this strategy on any number of processes, consolidate with :func:`consolidate_checkpoint`);
            ``full``: rank 0 gathers a single ``.ckpt`` file (needs the full model in rank-0 host memory).
        process_group_backend, timeout: as in Lightning's ``ModelParallelStrategy`` (default backend:
            ``nccl`` on GPUs, ``gloo`` on CPUs).
    """

    def __init__(
        self,
        block_types: list[str] | None = None,
        activation_checkpointing: bool = False,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        reshard_after_forward: bool = True,
        cpu_offload: bool = False,
        state_dict_type: Literal["full", "sharded"] = "sharded",
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if state_dict_type not in ("full", "sharded"):
            raise ValueError(f"state_dict_type={state_dict_type!r}: use 'full' or 'sharded'")
        super().__init__(
            data_parallel_size="auto", tensor_parallel_size=1,
            save_distributed_checkpoint=state_dict_type == "sharded",
            process_group_backend=process_group_backend, timeout=timeout,
        )
        self.state_dict_type = state_dict_type
        self.sharding_policy = ShardingPolicy(
            block_types=tuple(block_types or ()),
            activation_checkpointing=activation_checkpointing,
            param_dtype=_parse_dtype(param_dtype, "param_dtype"),
            reduce_dtype=_parse_dtype(reduce_dtype, "reduce_dtype"),
            reshard_after_forward=reshard_after_forward,
            cpu_offload=cpu_offload,
        )

    def setup_environment(self) -> None:
        # one mesh dimension over every process: pure FSDP, no tensor parallelism
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_fully_sharded(module: nn.Module) -> bool:
    """True when ``module`` or one of its sub-modules is already an FSDP2 unit."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _type_names(block_type: type | str) -> str:
    return block_type if isinstance(block_type, str) else f"{block_type.__module__}.{block_type.__qualname__}"


def _matches(module: nn.Module, names: set[str]) -> str | None:
    cls = type(module)
    for candidate in (cls.__name__, f"{cls.__module__}.{cls.__qualname__}"):
        if candidate in names:
            return candidate
    return None


def maybe_fully_shard(module: L.LightningModule, block_types: Iterable[type | str] = ()) -> bool:
    """Shard ``module`` with FSDP2 when its trainer runs a ``ModelParallelStrategy``; return whether it did.

    Call it at the end of ``configure_model()`` once every sub-module exists. Units are, bottom-up:
    every sub-module whose class is in ``block_types`` or in the strategy's ``block_types``, then each
    direct child of the LightningModule that owns parameters (the root units: everything left over,
    e.g. stems, heads, query embeddings). Activation checkpointing and the mixed precision policy
    come from :class:`FSDP2Strategy` (a plain ``ModelParallelStrategy`` gets float32 and no
    checkpointing). A module that is already sharded (the hook runs again when a Trainer or module
    is reused) is left alone.
    """
    trainer = module._trainer
    strategy = trainer.strategy if trainer is not None else None
    if not isinstance(strategy, ModelParallelStrategy):
        return False
    if is_fully_sharded(module):
        log.debug("%s is already sharded; configure_model leaves it as it is", type(module).__name__)
        return False
    policy = strategy.sharding_policy if isinstance(strategy, FSDP2Strategy) else ShardingPolicy()
    mesh = module.device_mesh
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"maybe_fully_shard applies data-parallel sharding only, but the device mesh has tensor_parallel size "
            f"{mesh['tensor_parallel'].size()}: use focalnet_pl.distributed.FSDP2Strategy "
            "(or ModelParallelStrategy(tensor_parallel_size=1))"
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names else mesh

    wanted = {_type_names(t) for t in block_types} | set(policy.block_types)
    units = [(m, hit) for m in module.modules() if m is not module and (hit := _matches(m, wanted))]
    if not units:
        raise ValueError(
            f"FSDP2: none of the block types {sorted(wanted)} occurs in {type(module).__name__}; name the module "
            "classes to shard in trainer.strategy.init_args.block_types"
        )
    found = Counter(hit for _, hit in units)
    unused = sorted(wanted - set(found))
    if unused:
        log.info("FSDP2: block types not present in %s: %s", type(module).__name__, ", ".join(unused))

    roots = shard_units(module, [unit for unit, _ in units], policy, dp_mesh)
    log.info(
        "FSDP2: sharded %s over %d processes: %s + %d root unit(s)%s%s",
        type(module).__name__, dp_mesh.size(), ", ".join(f"{n} {k}" for k, n in sorted(found.items())), len(roots),
        ", activation checkpointing" if policy.activation_checkpointing else "",
        f", compute in {policy.param_dtype}" if policy.param_dtype is not None else "",
    )
    return True


def shard_units(module: nn.Module, units: list[nn.Module], policy: ShardingPolicy, mesh: Any) -> list[nn.Module]:
    """Apply FSDP2 to ``units`` (sub-modules of ``module``, in ``module.modules()`` order) and then, as root
    units, to each direct child of ``module`` that still owns parameters; activation checkpointing and
    mixed precision per ``policy``. Returns the root units. (:func:`maybe_fully_shard` without Lightning.)"""
    from torch.distributed._composable import checkpoint as activation_checkpoint
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    offload = CPUOffloadPolicy() if policy.cpu_offload else OffloadPolicy()
    block_mp = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype)
    # root units hand float32 outputs back to the task's losses and metrics
    root_mp = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype,
                                   output_dtype=torch.float32 if policy.param_dtype is not None else None)
    if policy.activation_checkpointing:  # the strategy's checkpointing replaces the model's own
        for sub in module.modules():
            if sub is not module and callable(getattr(sub, "set_grad_checkpointing", None)):
                sub.set_grad_checkpointing(False)
    # modules() is pre-order: reversed, nested units are sharded before the units containing them
    for unit in reversed(units):
        if policy.activation_checkpointing:
            activation_checkpoint(unit)
        fully_shard(unit, mesh=mesh, reshard_after_forward=policy.reshard_after_forward,
                    mp_policy=block_mp, offload_policy=offload)
    roots = [child for child in module.children()
             if not isinstance(child, FSDPModule) and any(True for _ in child.parameters())]
    for root in roots:
        fully_shard(root, mesh=mesh, reshard_after_forward=False, mp_policy=root_mp, offload_policy=offload)
    return roots


def end_process_group() -> None:
    """Wait for every rank, then destroy the default process group (no-op when none is initialised).

    Without it, a rank that leaves first can abort another one's gloo/NCCL threads while the
    interpreter shuts down ("terminate called without an active exception", exit status -6).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def is_distributed_checkpoint(path: str | Path) -> bool:
    """True for a folder written by a sharded ``ModelParallelStrategy``/``FSDP2Strategy`` checkpoint."""
    path = Path(path)
    return path.is_dir() and (path / DCP_METADATA_FILE).is_file()


def load_distributed_checkpoint(path: str | Path) -> dict:
    """Read a sharded checkpoint folder into one in-memory Lightning checkpoint (full tensors, on CPU).

    Returns the Lightning metadata (``epoch``, ``global_step``, ``hyper_parameters``, loops, callbacks...)
    with ``state_dict`` (full model weights). Optimizer states are left out: resume training from the
    folder itself, with ``FSDP2Strategy``.
    """
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"distributed checkpoint folder {path} does not exist")
    if not is_distributed_checkpoint(path):
        raise ValueError(f"{path} is not a distributed checkpoint folder (no {DCP_METADATA_FILE} file)")
    with tempfile.TemporaryDirectory(prefix="consolidate-") as tmp:
        flat = Path(tmp) / "full.pt"
        dcp_to_torch_save(path, flat)
        tensors = load_checkpoint(flat)
    if "state_dict" not in tensors:
        raise KeyError(f"{path} holds no 'state_dict' entry (found {sorted(tensors)}); was it written by Lightning?")
    meta_file = path / LIGHTNING_METADATA_FILE
    checkpoint = load_checkpoint(meta_file) if meta_file.is_file() else {}
    checkpoint["state_dict"] = tensors["state_dict"]
    return checkpoint


def consolidate_checkpoint(source: str | Path, output: str | Path | None = None) -> Path:
    """Write the sharded checkpoint folder ``source`` as one Lightning checkpoint file and return its path.

    ``output`` defaults to ``<source>.consolidated.ckpt`` next to the folder. The file holds the model
    weights (``state_dict``) and Lightning's metadata; it loads with ``torch.load(..., weights_only=True)``.
    """
    source = Path(source)
    output = Path(output) if output is not None else source.with_name(source.name + ".consolidated.ckpt")
    checkpoint = load_distributed_checkpoint(source)
    atomic_torch_save(checkpoint, output)
    count = sum(t.numel() for t in checkpoint["state_dict"].values() if isinstance(t, torch.Tensor))
    log.info("Consolidated %s (%d tensors, %.1fM values) into %s",
             source, len(checkpoint["state_dict"]), count / 1e6, output)
    return output


def main(argv: list[str] | None = None) -> None:
    """``python -m focalnet_pl.distributed CHECKPOINT_DIR [-o OUTPUT]``: consolidate a sharded checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("checkpoint", help="folder written by FSDP2Strategy(state_dict_type='sharded')")
    parser.add_argument("-o", "--output", default=None, help="output file (default: <checkpoint>.consolidated.ckpt)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(consolidate_checkpoint(args.checkpoint, args.output))


if __name__ == "__main__":
    main()

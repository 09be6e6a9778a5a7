"""CPU fast paths for FocalNet: row-chunked block inference, and the focal projection for training.

A FocalNet block is mostly token-wise work (two LayerNorms, five linear layers, the gating, a GELU and
two residual adds) around two to four depthwise convolutions. Run op by op in eager mode, each of those
steps is a pass over the whole ``(B, H, W, C)`` activation through main memory, and at the
high-resolution stages those passes cost about as much as the matrix products.

At inference, :func:`block_forward` does a block's arithmetic differently:

- the token-wise work runs on chunks of :data:`CHUNK_TOKENS` tokens, so a chunk's intermediates (the
  MLP's ``4C``-wide hidden layer included) stay in cache from one op to the next;
- results are written in place (``out=``, ``addcmul_``, in-place GELU) and biases are added inside
  the GEMM, so few large tensors are allocated (on Linux each fresh one costs page faults);
- ``f``'s three outputs (query, context, gates) come from three GEMMs on row slices of its weight, so
  the context lands dense in the layout the depthwise convolutions read (no copy) and no GEMM has
  ``f``'s odd output width ``2C + L + 1``, which MKL runs about 20% slower than an even one;
- with oneDNN, each depthwise convolution applies its GELU inside the convolution kernel.

With autograd (training), :class:`FocalProjection` computes ``f`` the same three-GEMM way and writes
its gradients straight into the slices of one input / weight gradient, where slicing one ``f`` output
would make autograd build, zero-fill and sum a full-size gradient for each slice.

Both give the plain forward's numbers (tested to 1e-5) and are taken only where nothing else changes:
float32 CPU tensors, without autocast, ``torch.compile`` tracing, sharded (DTensor) parameters, forward
hooks or replaced layers (such as adapters); the block path also needs eval mode, no autograd and no
modulation-map recording. Everything else takes the plain PyTorch path. ``docs/benchmarks.md`` has the
measurements.

Whether a fast path is faster depends on the CPU (vector width, caches, the MKL and oneDNN kernels it
gets), so where one applies it is not assumed but measured: the first time a shape class (layer widths,
tokens rounded to a power of two, thread count) comes by, every candidate (plain; chunked with and
without oneDNN's fused convolution; the three-GEMM projection or not) runs on the actual input a few
times, interleaved, and the fastest (best time) is kept for the rest of the process
(:func:`calibration_report` lists the choices). ``FOCALNET_PL_CPU_FASTPATH=on`` takes the fast paths
without measuring, ``off`` never takes them (also :func:`set_enabled`).
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from focalnet_pl.layers.padding import masked_mean, zero_padding

if TYPE_CHECKING:
    from focalnet_pl.focalnet import FocalModulation, FocalNetBlock

__all__ = [
    "CHUNK_TOKENS", "MODES", "ONEDNN_CONV", "FocalProjection", "applies", "block_forward", "calibration_report",
    "cpu_description", "disabled", "projection_applies", "set_enabled", "set_mode",
]

#: tokens per chunk of token-wise work (2048 x 128 channels: 1 MB of input, 4 MB of MLP hidden layer)
CHUNK_TOKENS = 2048
#: whether PyTorch's oneDNN convolution with a fused GELU post-op is available
ONEDNN_CONV: bool = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
_enabled = True
MODES = ("auto", "on", "off")
#: ``auto``: measure which path is faster (default); ``on``: fast paths wherever they apply; ``off``: never
_mode = os.environ.get("FOCALNET_PL_CPU_FASTPATH", "auto")
if _mode not in MODES:
    raise ValueError(f"FOCALNET_PL_CPU_FASTPATH={_mode!r}: expected one of {MODES}")
#: runs of each candidate when calibrating (the best one counts)
CALIBRATION_REPEATS = 3
_decisions: dict[tuple, str] = {}
_timings: dict[tuple, dict[str, float]] = {}


def set_enabled(enabled: bool) -> None:
    """Switch the CPU fast paths on or off globally (on by default)."""
    global _enabled
    _enabled = enabled


def set_mode(mode: str) -> str:
    """``auto`` (measure), ``on`` or ``off`` (see the module docstring); returns the previous mode."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"CPU fast-path mode {mode!r}: expected one of {MODES}")
    previous, _mode = _mode, mode
    return previous


def calibration_report() -> list[str]:
    """One line per calibrated shape class: the candidates' best times and the choice."""
    lines = []
    for key, times in _timings.items():
        measured = ", ".join(f"{name} {seconds * 1e3:.2f} ms" for name, seconds in times.items())
        lines.append(f"{key[0]} {key[1:]}: {measured} -> {_decisions[key]}")
    return lines


def _calibrated(key: tuple, candidates: dict[str, Callable[[], object]]) -> str:
    """The fastest of ``candidates`` for ``key``: measured the first time (a warm-up, then
    :data:`CALIBRATION_REPEATS` interleaved runs each, best time), remembered afterwards."""
    choice = _decisions.get(key)
    if choice is None:
        times = dict.fromkeys(candidates, float("inf"))
        # own (identity) saved-tensor hooks: inside activation checkpointing, the calibration's autograd
        # graphs must not go through the checkpoint's hooks
        with torch.autograd.graph.saved_tensors_hooks(lambda tensor: tensor, lambda tensor: tensor):
            for run in candidates.values():
                run()
            for _ in range(CALIBRATION_REPEATS):
                for name, run in candidates.items():
                    start = time.perf_counter()
                    run()
                    times[name] = min(times[name], time.perf_counter() - start)
        choice = _decisions[key] = min(times, key=times.get)
        _timings[key] = times
    return choice


def _tokens_class(x: torch.Tensor) -> int:
    """Tokens of ``(B, H, W, C)`` rounded up to a power of two: one calibration per size class."""
    return (x.numel() // x.shape[-1] - 1).bit_length()


def cpu_description() -> str:
    """Model, core count and vector ISA of this CPU, and what PyTorch's kernels were told to use."""
    model = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and model:
                    break
    except OSError:
        pass
    hardware = [name for flag, name in (("avx512f", "AVX-512"), ("avx512_bf16", "AVX-512-BF16"), ("amx_tile", "AMX"),
                                        ("avx2", "AVX2"), ("fma", "FMA")) if flag in flags]
    limits = [f"{name}={os.environ[name]}" for name in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS",
                                                        "ONEDNN_MAX_CPU_ISA") if name in os.environ]
    return (f"{model}, {os.cpu_count()} logical cores, hardware {'/'.join(hardware) or 'unknown ISA'}, "
            f"ATen kernels {torch.backends.cpu.get_cpu_capability()}" + (f" ({', '.join(limits)})" if limits else ""))


@contextmanager
def disabled() -> Iterator[None]:
    """Run the plain PyTorch path inside the ``with`` block (e.g. to compare against it)."""
    previous = _enabled
    set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


def _plain_float32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and type(weight.data) is torch.Tensor
        # private on purpose: torch registers global hooks publicly (register_module_forward_hook) but has no
        # public way to ask whether any exist; only read, to take the plain forward when one does
        and not nn.modules.module._global_forward_hooks
        and not nn.modules.module._global_forward_pre_hooks
    )


def _unhooked(*modules: nn.Module) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def applies(block: FocalNetBlock, x: torch.Tensor) -> bool:
    """True when ``block(x)`` can take :func:`block_forward` (see the module docstring) and, in ``auto``
    mode, it was measured faster than the plain forward for this shape class."""
    possible = (
        not block.training
        and not torch.is_grad_enabled()
        and not block.modulation.record_maps
        and block.modulation.focal_level > 0
        and _plain_float32_cpu(x, block.norm2.weight)
        and _unmodified(block)
    )
    return possible and (_mode == "on" or _block_choice(block, x) != "plain")


def _block_key(block: FocalNetBlock, x: torch.Tensor) -> tuple:
    modulation = block.modulation
    return ("block", x.shape[-1], tuple(modulation.kernel_sizes), block.use_postln, modulation.ln is not None,
            _tokens_class(x), torch.get_num_threads())


def _block_choice(block: FocalNetBlock, x: torch.Tensor) -> str:
    if _mode == "off":
        return "plain"

    def plain() -> None:
        with disabled():
            block(x)

    candidates = {"plain": plain, "chunked": lambda: block_forward(block, x, onednn=False)}
    if ONEDNN_CONV:
        candidates["chunked+onednn"] = lambda: block_forward(block, x, onednn=True)
    return _calibrated(_block_key(block, x), candidates)


def projection_applies(f: nn.Module, x: torch.Tensor) -> bool:
    """True when the focal projection ``f(x)`` can take :class:`FocalProjection` and, in ``auto`` mode, it
    was measured faster (forward + backward) than ``f(x)`` sliced for this shape class."""
    possible = type(f) is nn.Linear and f.bias is not None and _plain_float32_cpu(x, f.weight) and _unhooked(f)
    return possible and (_mode == "on" or (_mode == "auto" and _projection_choice(f, x) == "three GEMMs"))


def _projection_choice(f: nn.Linear, x: torch.Tensor) -> str:
    """Calibrate on detached copies (forward and backward, as in training), leaving ``f``'s gradients alone."""
    batch, height, width, dim = x.shape
    grad = torch.is_grad_enabled()
    tokens = x.detach().reshape(-1, dim).requires_grad_(grad and x.requires_grad)
    weight = f.weight.detach().requires_grad_(grad and f.weight.requires_grad)
    bias = f.bias.detach().requires_grad_(grad and f.bias.requires_grad)
    leaves = [t for t in (tokens, weight, bias) if t.requires_grad]
    gates = f.weight.shape[0] - 2 * dim
    grads = (torch.ones(tokens.shape[0], dim), torch.ones(tokens.shape[0], dim), torch.ones(tokens.shape[0], gates))

    def backward(outputs: tuple[torch.Tensor, ...]) -> None:
        if leaves:
            torch.autograd.backward(outputs, [g.view_as(o) for g, o in zip(grads, outputs)], inputs=leaves)
            for leaf in leaves:
                leaf.grad = None

    def three_gemms() -> None:
        backward(FocalProjection.apply(tokens, weight, bias, dim))

    def linear() -> None:
        qcg = F.linear(tokens.view(batch, height, width, dim), weight, bias)
        context = qcg[..., dim : 2 * dim].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        backward((qcg[..., :dim], context.permute(0, 2, 3, 1), qcg[..., 2 * dim :]))

    key = ("projection", dim, gates, _tokens_class(x), torch.get_num_threads(), bool(leaves))
    return _calibrated(key, {"linear": linear, "three GEMMs": three_gemms})


def _unmodified(block: FocalNetBlock) -> bool:
    """No hooks anywhere in the block and its layers are the stock ones: :func:`block_forward` reads
    their weights directly, so a forward hook or a replaced layer (e.g. a LoRA adapter) needs the
    plain forward, which calls the modules."""
    modulation, mlp = block.modulation, block.mlp
    layers = (modulation.f, modulation.h, modulation.proj, mlp.fc1, mlp.fc2)
    norms = (block.norm1, block.norm2) + ((modulation.ln,) if modulation.ln is not None else ())
    gelus = (mlp.act, modulation.act) + tuple(level[1] for level in modulation.focal_layers)
    return (
        all(type(layer) is nn.Linear for layer in layers)
        and all(type(norm) is nn.LayerNorm for norm in norms)
        and all(type(level[0]) is nn.Conv2d for level in modulation.focal_layers)
        and all(type(gelu) is nn.GELU and gelu.approximate == "none" for gelu in gelus)
        and _unhooked(*block.modules())
    )


class FocalProjection(torch.autograd.Function):
    """``f``'s query ``(M, C)``, context ``(M, C)`` and gates ``(M, L + 1)`` from tokens ``(M, C)``."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int):
        ctx.save_for_backward(tokens, weight)
        ctx.dim = dim
        return _project_tokens(tokens, weight, bias, dim)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        tokens, weight = ctx.saved_tensors
        rows = _projection_rows(ctx.dim)
        grad_tokens = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_tokens = torch.mm(grads[0], weight[rows[0]])
            for grad, part in zip(grads[1:], rows[1:]):
                grad_tokens.addmm_(grad, weight[part])
        if ctx.needs_input_grad[1]:
            grad_weight = torch.empty_like(weight)
            for grad, part in zip(grads, rows):
                torch.mm(grad.t(), tokens, out=grad_weight[part])
        if ctx.needs_input_grad[2]:
            grad_bias = torch.cat([grad.sum(0) for grad in grads])
        return grad_tokens, grad_weight, grad_bias, None


def _projection_rows(dim: int) -> tuple[slice, slice, slice]:
    """Rows of ``f``'s weight giving the query, the context and the gates."""
    return slice(0, dim), slice(dim, 2 * dim), slice(2 * dim, None)


def _project_tokens(
    tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dim: int,
    outs: tuple[torch.Tensor | None, ...] = (None, None, None),
) -> tuple[torch.Tensor, ...]:
    """Query, context and gates of ``f`` as three GEMMs (written into ``outs`` where given)."""
    return tuple(
        torch.addmm(bias[rows], tokens, weight[rows].t(), out=out) for rows, out in zip(_projection_rows(dim), outs)
    )


def _row_chunks(rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of near-equal chunks of at most :data:`CHUNK_TOKENS` rows."""
    count = -(-rows // CHUNK_TOKENS)
    step = -(-rows // count)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _conv_gelu(x: torch.Tensor, layer: nn.Sequential, onednn: bool) -> torch.Tensor:
    """``layer`` (depthwise conv + GELU) on channels-last ``x``, with ``onednn`` the GELU fused into oneDNN's kernel."""
    conv = layer[0]
    if not (onednn and ONEDNN_CONV):
        return layer(x)
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "gelu", [], "none",
    )


def _project(block: FocalNetBlock, tokens: torch.Tensor, shape: tuple[int, int, int, int]) -> tuple[torch.Tensor, ...]:
    """Query ``(M, C)``, context ``(B, H, W, C)`` and gates ``(M, L + 1)`` from ``f`` (after ``norm1`` if pre-LN)."""
    modulation = block.modulation
    C = modulation.dim
    weight, bias = modulation.f.weight, modulation.f.bias
    query = tokens.new_empty(tokens.shape)
    context = tokens.new_empty(shape)
    gates = tokens.new_empty(tokens.shape[0], modulation.focal_level + 1)
    context_rows = context.view(-1, C)
    for start, stop in _row_chunks(tokens.shape[0]):
        x = tokens[start:stop]
        if not block.use_postln:
            x = _layer_norm(x, block.norm1)
        _project_tokens(x, weight, bias, C, (query[start:stop], context_rows[start:stop], gates[start:stop]))
    return query, context, gates


def _focal_levels(
    modulation: FocalModulation, context: torch.Tensor, onednn: bool, padding_mask: torch.Tensor | None = None
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Each level's context as ``(M, C)`` rows, and the global context ``(B, C)`` (padding handled as in
    :class:`~focalnet_pl.focalnet.FocalModulation`)."""
    C = modulation.dim
    x = context.permute(0, 3, 1, 2)  # the NHWC buffer seen as channels-last NCHW
    levels = []
    for layer in modulation.focal_layers:
        x = _conv_gelu(zero_padding(x, padding_mask), layer, onednn)
        levels.append(x.permute(0, 2, 3, 1).reshape(-1, C))
    return levels, F.gelu(masked_mean(x, padding_mask))


def _modulate(
    modulation: FocalModulation, query: torch.Tensor, levels: list[torch.Tensor], global_context: torch.Tensor,
    gates: torch.Tensor, start: int, stop: int, tokens_per_image: int,
) -> torch.Tensor:
    """The modulation's output (before the residual) for rows ``start:stop``."""
    L = modulation.focal_level
    gate = gates[start:stop]
    aggregated = levels[0][start:stop] * gate[:, 0:1]
    for level in range(1, L):
        aggregated.addcmul_(levels[level][start:stop], gate[:, level : level + 1])
    for image in range(start // tokens_per_image, (stop - 1) // tokens_per_image + 1):
        lo = max(start, image * tokens_per_image) - start
        hi = min(stop, (image + 1) * tokens_per_image) - start
        aggregated[lo:hi].addcmul_(global_context[image : image + 1], gate[lo:hi, L : L + 1])
    alpha = 1.0 / (L + 1) if modulation.normalize_modulator else 1.0
    modulator = torch.addmm(modulation.h.bias, aggregated, modulation.h.weight.t(), alpha=alpha)
    modulator.mul_(query[start:stop])
    if modulation.ln is not None:
        modulator = _layer_norm(modulator, modulation.ln)
    return torch.addmm(modulation.proj.bias, modulator, modulation.proj.weight.t(), out=aggregated)


def _add_residual(
    x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None, out: torch.Tensor | None = None
) -> torch.Tensor:
    if gamma is None:
        return torch.add(x, branch, out=out)
    return torch.addcmul(x, branch, gamma, out=out)


def block_forward(
    block: FocalNetBlock, x: torch.Tensor, onednn: bool | None = None, padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``block(x, padding_mask)`` at CPU inference, for ``x`` of shape ``(B, H, W, C)`` (check :func:`applies` first).

    ``onednn``: depthwise convolutions with oneDNN's fused GELU; by default as calibrated for this shape
    class (or wherever available in ``on`` mode)."""
    if onednn is None:
        onednn = _mode == "on" or _decisions.get(_block_key(block, x), "chunked+onednn") == "chunked+onednn"
    B, H, W, C = x.shape
    tokens = x.reshape(-1, C)
    modulation, mlp = block.modulation, block.mlp
    query, context, gates = _project(block, tokens, (B, H, W, C))
    levels, global_context = _focal_levels(modulation, context, onednn, padding_mask)
    out = torch.empty_like(tokens)
    for start, stop in _row_chunks(tokens.shape[0]):
        branch = _modulate(modulation, query, levels, global_context, gates, start, stop, H * W)
        if block.use_postln:
            branch = _layer_norm(branch, block.norm1)
        mid = _add_residual(tokens[start:stop], branch, block.gamma_1, out=out[start:stop])
        hidden = mid if block.use_postln else _layer_norm(mid, block.norm2)
        hidden = torch.ops.aten.gelu_(torch.addmm(mlp.fc1.bias, hidden, mlp.fc1.weight.t()))
        branch = torch.addmm(mlp.fc2.bias, hidden, mlp.fc2.weight.t())
        if block.use_postln:
            branch = _layer_norm(branch, block.norm2)
        _add_residual(mid, branch, block.gamma_2, out=mid)
    return out.view(B, H, W, C)

"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", 2021).

The sampling core, :func:`ms_deform_attn_sample`, has a pure-PyTorch path built on
:func:`torch.nn.functional.grid_sample` that runs on any device, and dispatches to a fused kernel where
one accepts the input. By default that is the Triton kernel of
:mod:`focalnet_pl.layers.ms_deform_attn_triton` on CUDA (Triton ships with the CUDA builds of torch:
nothing to compile at install), or else the CUDA extension compiled from the Deformable DETR sources
(importable as ``MultiScaleDeformableAttention``) when it is installed. The environment variable
``FOCALNET_PL_MSDA`` chooses at import: ``auto`` (default), ``triton`` (also on CPU tensors, through
Triton's interpreter when ``TRITON_INTERPRET=1``), ``cuda-ext`` or ``pytorch`` (never fused). Any other
implementation can be plugged in with :func:`register_fused_kernel`; the PyTorch path is always the
fallback and the reference.

Level shapes are needed on the host for the PyTorch path and for validation. For a device tensor they
are read once (one device sync) and remembered for that tensor; :func:`spatial_shapes_tensor` builds the
tensor from host sizes without any sync.
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from focalnet_pl.layers.precision import autocast_off, float32, run_in_float32
from focalnet_pl.matching import to_device_async

__all__ = [
    "FusedKernel",
    "MultiScaleDeformableAttention",
    "get_fused_kernel",
    "level_starts",
    "ms_deform_attn_sample",
    "ms_deform_attn_sample_pytorch",
    "register_fused_kernel",
    "spatial_shapes_list",
    "spatial_shapes_tensor",
    "triton_kernel",
]

# (value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> output
FusedKernelFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class FusedKernel:
    """A fused sampling implementation and the device types / dtypes it accepts."""

    name: str
    fn: FusedKernelFn
    device_types: tuple[str, ...] = ("cuda",)
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64)

    def accepts(self, value: Tensor) -> bool:
        return value.device.type in self.device_types and value.dtype in self.dtypes


_fused_kernel: FusedKernel | None = None


def register_fused_kernel(kernel: FusedKernel | None) -> FusedKernel | None:
    """Install ``kernel`` as the fused implementation (``None`` removes it); returns the previous one."""
    global _fused_kernel
    previous, _fused_kernel = _fused_kernel, kernel
    return previous


def get_fused_kernel() -> FusedKernel | None:
    """The currently installed fused implementation, if any."""
    return _fused_kernel


def _compiled_extension_kernel() -> FusedKernel | None:
    """Wrap the Deformable DETR CUDA extension (``MultiScaleDeformableAttention``) if it is installed."""
    try:
        import MultiScaleDeformableAttention as msda_ext  # type: ignore[import-not-found]
    except ImportError:
        return None

    class _ExtensionFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, value, shapes, starts, locations, weights, im2col_step):  # type: ignore[override]
            ctx.im2col_step = im2col_step
            ctx.save_for_backward(value, shapes, starts, locations, weights)
            return msda_ext.ms_deform_attn_forward(value, shapes, starts, locations, weights, im2col_step)

        @staticmethod
        def backward(ctx, grad_output):  # type: ignore[override]
            value, shapes, starts, locations, weights = ctx.saved_tensors
            grad_value, grad_locations, grad_weights = msda_ext.ms_deform_attn_backward(
                value, shapes, starts, locations, weights, grad_output.contiguous(), ctx.im2col_step
            )
            return grad_value, None, None, grad_locations, grad_weights, None

    def run(value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
        return _ExtensionFunction.apply(value, shapes, starts, locations, weights, 64)

    return FusedKernel(name="MultiScaleDeformableAttention(cuda-ext)", fn=run)


def _triton_sample(value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
    from focalnet_pl.layers import ms_deform_attn_triton as kernels  # imports Triton on first use

    if value.device.type == "cpu" and not kernels.INTERPRETED:
        raise RuntimeError(
            "the Triton deformable-attention kernel got CPU tensors: set TRITON_INTERPRET=1 before Triton is "
            "imported to run it through Triton's interpreter, or FOCALNET_PL_MSDA=auto to use the PyTorch path"
        )
    return kernels.ms_deform_attn_triton(value, shapes, starts, locations, weights)


def triton_kernel(device_types: tuple[str, ...] = ("cuda",)) -> FusedKernel:
    """The Triton kernel as a :class:`FusedKernel` (``("cuda", "cpu")`` to run it on CPU via the interpreter)."""
    return FusedKernel("triton", _triton_sample, device_types, (torch.float32, torch.bfloat16, torch.float16))


MSDA_CHOICES = ("auto", "triton", "cuda-ext", "pytorch")


def _default_fused_kernel(choice: str) -> FusedKernel | None:
    """The kernel ``FOCALNET_PL_MSDA=choice`` asks for (see the module docstring)."""
    if choice not in MSDA_CHOICES:
        raise ValueError(f"FOCALNET_PL_MSDA={choice!r}: expected one of {MSDA_CHOICES}")
    has_triton = importlib.util.find_spec("triton") is not None
    if choice == "triton":
        if not has_triton:
            raise ImportError("FOCALNET_PL_MSDA=triton, but the triton package is not installed")
        return triton_kernel(("cuda", "cpu"))
    if choice == "cuda-ext":
        kernel = _compiled_extension_kernel()
        if kernel is None:
            raise ImportError("FOCALNET_PL_MSDA=cuda-ext, but MultiScaleDeformableAttention is not importable")
        return kernel
    if choice == "auto":
        return triton_kernel() if has_triton else _compiled_extension_kernel()
    return None


register_fused_kernel(_default_fused_kernel(os.environ.get("FOCALNET_PL_MSDA", "auto")))

_host_shapes: WeakIdKeyDictionary = WeakIdKeyDictionary()


def spatial_shapes_tensor(sizes: Sequence[Sequence[int]], device: torch.device | str | None = None) -> Tensor:
    """``(L, 2)`` long tensor of level sizes ``(H_l, W_l)`` on ``device``, copied there without waiting for
    the device, and with its host copy remembered for :func:`spatial_shapes_list`.

    Traced with symbolic sizes (``torch.export`` / ONNX with dynamic height and width), the sizes stay
    symbolic: the tensor is built by graph ops and the remembered sizes are the symbols."""
    if any(isinstance(size, torch.SymInt) for level in sizes for size in level):
        sizes = tuple((h, w) for h, w in sizes)
        tensor = torch.stack([torch.scalar_tensor(size, dtype=torch.long, device=device)
                              for level in sizes for size in level]).view(-1, 2)
        _host_shapes[tensor] = sizes
        return tensor
    sizes = tuple((int(h), int(w)) for h, w in sizes)
    tensor = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
    tensor = to_device_async(tensor, torch.device(device) if device is not None else tensor.device)
    _host_shapes[tensor] = sizes
    return tensor


def spatial_shapes_list(spatial_shapes: Tensor) -> tuple[tuple[int, int], ...]:
    """The level sizes of ``spatial_shapes`` as host ints: remembered for tensors made by
    :func:`spatial_shapes_tensor`; read once (a device sync) and remembered for other device tensors
    (shape tensors are treated as immutable); read each time for other CPU tensors."""
    sizes = _host_shapes.get(spatial_shapes)
    if sizes is None:
        sizes = tuple((int(h), int(w)) for h, w in spatial_shapes.tolist())
        if spatial_shapes.device.type != "cpu":
            _host_shapes[spatial_shapes] = sizes
    return sizes


def level_starts(spatial_shapes: Tensor) -> Tensor:
    """Offset of each level's first position in the flattened multi-scale sequence: ``(L,)`` from ``(L, 2)``."""
    areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def _check_shapes(value: Tensor, spatial_shapes: Tensor, locations: Tensor, weights: Tensor) -> None:
    if value.dim() != 4:
        raise ValueError(f"value must be (B, S, heads, head_dim), got shape {tuple(value.shape)}")
    if spatial_shapes.dim() != 2 or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be (L, 2), got shape {tuple(spatial_shapes.shape)}")
    batch, length, heads, _ = value.shape
    levels = spatial_shapes.shape[0]
    sizes = spatial_shapes_list(spatial_shapes)
    total = sum(height * width for height, width in sizes)
    if total != length:
        raise ValueError(f"spatial_shapes {list(sizes)} cover {total} positions but value has {length}")
    if locations.dim() != 6 or locations.shape[0] != batch or locations.shape[2] != heads or locations.shape[3] != levels:
        raise ValueError(
            f"sampling_locations must be (B={batch}, Q, heads={heads}, L={levels}, P, 2), got {tuple(locations.shape)}"
        )
    if locations.shape[-1] != 2:
        raise ValueError(f"sampling_locations last dim must be 2 (x, y), got {locations.shape[-1]}")
    if weights.shape != locations.shape[:-1]:
        raise ValueError(
            f"attention_weights shape {tuple(weights.shape)} must equal sampling_locations[..., 0] "
            f"shape {tuple(locations.shape[:-1])}"
        )


def ms_deform_attn_sample_pytorch(
    value: Tensor, spatial_shapes: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Pure-PyTorch multi-scale deformable sampling (bilinear, zeros outside, ``align_corners=False``).

    Args:
        value: ``(B, S, heads, head_dim)``, the levels flattened row-major and concatenated.
        spatial_shapes: ``(L, 2)`` long, ``(H_l, W_l)`` per level.
        sampling_locations: ``(B, Q, heads, L, P, 2)``, normalised ``(x, y)`` in ``[0, 1]``.
        attention_weights: ``(B, Q, heads, L, P)``.

    Returns:
        ``(B, Q, heads * head_dim)``.
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    level_sizes = spatial_shapes_list(spatial_shapes)
    value_levels = value.split([height * width for height, width in level_sizes], dim=1)
    # grid_sample works in [-1, 1]; fold heads into the batch dimension.
    grids = (2.0 * sampling_locations - 1.0).transpose(1, 2).flatten(0, 1)  # (B*heads, Q, L, P, 2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    output = None
    for level, (height, width) in enumerate(level_sizes):
        value_map = value_levels[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        sampled = F.grid_sample(
            value_map, grids[:, :, level], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (B*heads, head_dim, Q, P)
        # weighted sum over the points of this level, accumulated over levels (no (.., L*P) stack)
        contribution = (sampled * weights[:, :, :, level]).sum(-1)  # (B*heads, head_dim, Q)
        output = contribution if output is None else output + contribution
    return output.view(batch, heads * head_dim, queries).transpose(1, 2).contiguous()


def ms_deform_attn_sample(
    value: Tensor,
    spatial_shapes: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
    level_start_index: Tensor | None = None,
    use_fused: bool = True,
) -> Tensor:
    """Multi-scale deformable sampling; dispatches to the registered fused kernel when it accepts the input.

    Shapes as in :func:`ms_deform_attn_sample_pytorch`. ``use_fused=False`` forces the PyTorch path, which
    computes in float32 at least (autocast off) and returns ``value``'s dtype, as the fused kernels do.
    """
    _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
    kernel = _fused_kernel
    if use_fused and kernel is not None and kernel.accepts(value):
        if level_start_index is None:
            level_start_index = level_starts(spatial_shapes)
        return kernel.fn(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    with autocast_off(value.device):  # bilinear sampling and the weighted sum in float32 (or float64)
        output = ms_deform_attn_sample_pytorch(*float32((value, spatial_shapes, sampling_locations, attention_weights)))
    return output.to(value.dtype)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``num_levels`` feature maps with ``num_points`` samples per head and level."""

    def __init__(self, embed_dim: int = 256, num_heads: int = 8, num_levels: int = 4, num_points: int = 4) -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_levels = num_levels
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR init: offsets start on a ring of head directions, ``k``-th point at radius ``k``."""
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for layer in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor | None = None,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` (B, Q, C) around ``reference_points`` into ``value`` (B, S, C).

        ``reference_points`` is ``(B, Q, L, 2)`` normalised points (offsets are in units of each level's
        pixels) or ``(B, Q, L, 4)`` normalised ``(cx, cy, w, h)`` boxes (offsets scale with the box).
        ``value_padding_mask`` (B, S) is True at padded positions, which then contribute nothing.
        """
        batch, queries, _ = query.shape
        _, length, _ = value.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        if spatial_shapes.shape[0] != levels:
            raise ValueError(f"spatial_shapes has {spatial_shapes.shape[0]} levels, module built for {levels}")
        if reference_points.shape[:3] != (batch, queries, levels):
            raise ValueError(
                f"reference_points must be (B={batch}, Q={queries}, L={levels}, 2|4), got {tuple(reference_points.shape)}"
            )
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"reference_points last dim must be 2 or 4, got {reference_points.shape[-1]}")

        value = self.value_proj(value)
        if value_padding_mask is not None:
            value = value.masked_fill(value_padding_mask[..., None], 0.0)
        value = value.view(batch, length, heads, self.embed_dim // heads)

        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weight_logits = self.attention_weights(query).view(batch, queries, heads, levels * points)
        locations, weights = _locations_and_weights(reference_points, spatial_shapes, offsets, weight_logits)
        output = ms_deform_attn_sample(value, spatial_shapes, locations, weights, level_start_index)
        return self.output_proj(output)


@run_in_float32
def _locations_and_weights(reference_points: Tensor, spatial_shapes: Tensor, offsets: Tensor,
                           weight_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Sampling locations ``(B, Q, heads, L, P, 2)`` and attention weights ``(B, Q, heads, L, P)``, in float32
    (in bfloat16 a location in ``[0, 1]`` is off by up to 1/512 of the map: a pixel of a 512-wide level)."""
    batch, queries, heads, levels, points, _ = offsets.shape
    weights = weight_logits.softmax(-1).view(batch, queries, heads, levels, points)
    if reference_points.shape[-1] == 2:
        normalizer = torch.stack([spatial_shapes[:, 1], spatial_shapes[:, 0]], dim=-1).to(offsets.dtype)
        locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
    else:
        centers = reference_points[:, :, None, :, None, :2]
        sizes = reference_points[:, :, None, :, None, 2:]
        locations = centers + offsets / points * sizes * 0.5
    return locations, weights

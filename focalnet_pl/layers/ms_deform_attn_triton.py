"""Fused multi-scale deformable attention sampling in Triton: forward and backward, no compile step at install.

One program handles ``BLOCK_R`` rows, a row being one (image, query, head), and all of the head's channels. For every
level and point it reads the four bilinear corners of the value map (zeros outside, ``align_corners=False``,
as :func:`focalnet_pl.layers.ms_deform_attn_sample_pytorch`) and accumulates the attention-weighted sample
in float32, whatever the input dtype (float32, bfloat16, float16). The backward pass recomputes the corners,
writes the location and attention-weight gradients (each owned by one program) and scatters the value
gradient with atomic adds into a float32 buffer.

Level shapes and start offsets are read from device tensors inside the kernels, so a call never waits for
the device. With ``TRITON_INTERPRET=1`` set before Triton is imported, the same kernels run on CPU tensors
through Triton's interpreter; the tests check them that way against the PyTorch path.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETED", "ms_deform_attn_triton"]

#: whether the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``) rather than compiled
INTERPRETED: bool = (
    bool(triton.knobs.runtime.interpret) if hasattr(triton, "knobs")  # Triton >= 3.4
    else os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")
)


def _configs(heavy: bool) -> list[triton.Config]:
    """Rows per program x warps, autotuned among: 4 to 16 elements of a 32-wide head per thread (compiled
    for sm_90 without spills, under 100 registers); the backward keeps more tiles alive and takes half the rows."""
    shapes = ((16, 4), (32, 4), (32, 8), (64, 8)) if heavy else ((32, 4), (64, 4), (64, 8), (128, 8))
    return [triton.Config({"BLOCK_R": rows}, num_warps=warps) for rows, warps in shapes]


@triton.jit
def _row_block(num_rows, num_queries, num_tokens, HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WIDE: tl.constexpr, ALIGN: tl.constexpr):
    """This program's rows, a row being one (image, query, head), with their mask, the channel offsets and
    mask, and each row's offset of its (image, head) in ``value``. value (B, S, heads, D), locations
    (B, Q, heads, L, P, 2), weights (B, Q, heads, L, P) and out (B, Q, heads * D) are row-major. Offsets
    are int64 only when ``WIDE`` (a tensor of 2**31 elements or more); they are multiples of ``ALIGN``
    (so that rows of a head load as vectors)."""
    block = tl.program_id(0)
    if WIDE:
        block = block.to(tl.int64)
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    channels = tl.arange(0, BLOCK_D)
    value_rows = ((rows // (num_queries * HEADS)) * num_tokens * HEADS + rows % HEADS) * HEAD_DIM
    return rows, rows < num_rows, channels, channels < HEAD_DIM, tl.multiple_of(value_rows, ALIGN)


@triton.jit
def _tile_mask(mask, d_mask, EVEN_D: tl.constexpr):
    """Rows mask x channels mask; without the channel part when the head fills the block (so that a
    head's contiguous channels load as vectors)."""
    tile = mask[:, None]
    if not EVEN_D:
        tile = tile & d_mask[None, :]
    return tile


@triton.jit
def _load_rows(value_ptr, offsets, mask, channels, d_mask, EVEN_D: tl.constexpr):
    return tl.load(value_ptr + offsets[:, None] + channels[None, :], mask=_tile_mask(mask, d_mask, EVEN_D),
                   other=0.0).to(tl.float32)


@triton.jit
def _scatter_rows(grad_ptr, offsets, mask, channels, d_mask, values, EVEN_D: tl.constexpr):
    # relaxed: only the sum matters (no ordering with other memory operations)
    tl.atomic_add(grad_ptr + offsets[:, None] + channels[None, :], values, mask=_tile_mask(mask, d_mask, EVEN_D),
                  sem="relaxed")


@triton.jit
def _sampling_point(value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, level, index, row_mask,
                    value_rows, channels, d_mask, row_stride, WIDE: tl.constexpr, EVEN_D: tl.constexpr):
    """One sampling point of a level for a block of rows: fractional offsets ``(lx, ly)``, the attention
    weight, the level's size in pixels, and for the corners (x0, y0), (x0 + 1, y0), (x0, y0 + 1),
    (x0 + 1, y0 + 1): element offsets in ``value``, inside masks and values (zero outside)."""
    height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
    width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
    start = tl.load(starts_ptr + level).to(tl.int32)
    x = tl.load(locations_ptr + 2 * index, mask=row_mask, other=0.0).to(tl.float32)
    y = tl.load(locations_ptr + 2 * index + 1, mask=row_mask, other=0.0).to(tl.float32)
    weight = tl.load(weights_ptr + index, mask=row_mask, other=0.0).to(tl.float32)
    width_f = width.to(tl.float32)
    height_f = height.to(tl.float32)
    x = x * width_f - 0.5  # align_corners=False: pixel centres at (i + 0.5) / size
    y = y * height_f - 0.5
    x_low = tl.floor(x)
    y_low = tl.floor(y)
    # clamp before the integer conversion so that far-away points cannot overflow it (they read zeros anyway)
    x0 = tl.minimum(tl.maximum(x_low, -2.0), width_f).to(tl.int32)
    y0 = tl.minimum(tl.maximum(y_low, -2.0), height_f).to(tl.int32)
    left = row_mask & (x0 >= 0) & (x0 < width)
    right = row_mask & (x0 >= -1) & (x0 < width - 1)
    top = (y0 >= 0) & (y0 < height)
    bottom = (y0 >= -1) & (y0 < height - 1)
    token = start + y0 * width + x0
    if WIDE:
        token = token.to(tl.int64)
    o00 = value_rows + token * row_stride
    o01 = o00 + row_stride
    o10 = o00 + width * row_stride
    o11 = o10 + row_stride
    m00, m01, m10, m11 = left & top, right & top, left & bottom, right & bottom
    v00 = _load_rows(value_ptr, o00, m00, channels, d_mask, EVEN_D)
    v01 = _load_rows(value_ptr, o01, m01, channels, d_mask, EVEN_D)
    v10 = _load_rows(value_ptr, o10, m10, channels, d_mask, EVEN_D)
    v11 = _load_rows(value_ptr, o11, m11, channels, d_mask, EVEN_D)
    return (x - x_low, y - y_low, weight, width_f, height_f, o00, o01, o10, o11, m00, m01, m10, m11,
            v00, v01, v10, v11)


@triton.autotune(configs=_configs(heavy=False), key=["row_bucket", "HEADS", "HEAD_DIM", "LEVELS", "POINTS"])
@triton.jit
def _msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, out_ptr,
    num_rows, num_queries, num_tokens, row_bucket,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
    WIDE: tl.constexpr, ALIGN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_mask, channels, d_mask, value_rows = _row_block(
        num_rows, num_queries, num_tokens, HEADS, HEAD_DIM, BLOCK_R, BLOCK_D, WIDE, ALIGN)
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for level in range(LEVELS):
        for point in range(POINTS):
            lx, ly, weight, _, _, _, _, _, _, _, _, _, _, v00, v01, v10, v11 = _sampling_point(
                value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, level,
                rows * (LEVELS * POINTS) + level * POINTS + point, row_mask, value_rows, channels, d_mask,
                HEADS * HEAD_DIM, WIDE, BLOCK_D == HEAD_DIM,
            )
            upper = v00 + (v01 - v00) * lx[:, None]
            lower = v10 + (v11 - v10) * lx[:, None]
            acc += (upper + (lower - upper) * ly[:, None]) * weight[:, None]
    out_offsets = rows[:, None] * HEAD_DIM + channels[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty),
             mask=_tile_mask(row_mask, d_mask, BLOCK_D == HEAD_DIM))


@triton.autotune(configs=_configs(heavy=True), key=["row_bucket", "HEADS", "HEAD_DIM", "LEVELS", "POINTS"],
                 reset_to_zero=["grad_value_ptr"])
@triton.jit
def _msda_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, grad_out_ptr,
    grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    num_rows, num_queries, num_tokens, row_bucket,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
    WIDE: tl.constexpr, ALIGN: tl.constexpr, VALUE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_mask, channels, d_mask, value_rows = _row_block(
        num_rows, num_queries, num_tokens, HEADS, HEAD_DIM, BLOCK_R, BLOCK_D, WIDE, ALIGN)
    grad_out = _load_rows(grad_out_ptr, rows * HEAD_DIM, row_mask, channels, d_mask, BLOCK_D == HEAD_DIM)
    for level in range(LEVELS):
        for point in range(POINTS):
            index = rows * (LEVELS * POINTS) + level * POINTS + point
            lx, ly, weight, width_f, height_f, o00, o01, o10, o11, m00, m01, m10, m11, v00, v01, v10, v11 = (
                _sampling_point(value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, level, index,
                                row_mask, value_rows, channels, d_mask, HEADS * HEAD_DIM, WIDE,
                                BLOCK_D == HEAD_DIM)
            )
            hx = 1.0 - lx
            hy = 1.0 - ly
            # the sample and its derivatives along x and y (in pixels)
            sample = (v00 * hx[:, None] + v01 * lx[:, None]) * hy[:, None] + (v10 * hx[:, None] + v11 * lx[:, None]) * ly[:, None]
            d_x = (v01 - v00) * hy[:, None] + (v11 - v10) * ly[:, None]
            d_y = (v10 - v00) * hx[:, None] + (v11 - v01) * lx[:, None]
            grad_weight = tl.sum(grad_out * sample, axis=1)
            grad_x = tl.sum(grad_out * d_x, axis=1) * weight * width_f
            grad_y = tl.sum(grad_out * d_y, axis=1) * weight * height_f
            tl.store(grad_weights_ptr + index, grad_weight.to(grad_weights_ptr.dtype.element_ty), mask=row_mask)
            location_dtype = grad_locations_ptr.dtype.element_ty
            tl.store(grad_locations_ptr + 2 * index, grad_x.to(location_dtype), mask=row_mask)
            tl.store(grad_locations_ptr + 2 * index + 1, grad_y.to(location_dtype), mask=row_mask)
            if VALUE_GRAD:  # scattered into a float32 buffer of value's layout
                scaled = grad_out * weight[:, None]
                _scatter_rows(grad_value_ptr, o00, m00, channels, d_mask, scaled * (hy * hx)[:, None], BLOCK_D == HEAD_DIM)
                _scatter_rows(grad_value_ptr, o01, m01, channels, d_mask, scaled * (hy * lx)[:, None], BLOCK_D == HEAD_DIM)
                _scatter_rows(grad_value_ptr, o10, m10, channels, d_mask, scaled * (ly * hx)[:, None], BLOCK_D == HEAD_DIM)
                _scatter_rows(grad_value_ptr, o11, m11, channels, d_mask, scaled * (ly * lx)[:, None], BLOCK_D == HEAD_DIM)


def _launch(kernel, value: Tensor, locations: Tensor, *args, **kwargs) -> None:
    """Run ``kernel`` over the rows of ``locations``, block size autotuned (compiled) or one block
    (interpreted: the interpreter's cost is per operation, not per element)."""
    batch, num_tokens, heads, head_dim = value.shape
    _, num_queries, _, levels, points, _ = locations.shape
    num_rows = batch * num_queries * heads
    kwargs.update(
        num_rows=num_rows, num_queries=num_queries, num_tokens=num_tokens,
        row_bucket=num_rows.bit_length(),  # autotune once per power of two of the work
        HEADS=heads, HEAD_DIM=head_dim, LEVELS=levels, POINTS=points, BLOCK_D=triton.next_power_of_2(head_dim),
        WIDE=max(value.numel(), locations.numel()) >= 2**31, ALIGN=head_dim & -head_dim,
    )
    if INTERPRETED:
        block = min(triton.next_power_of_2(num_rows), 4096)
        kernel.fn[(triton.cdiv(num_rows, block),)](*args, BLOCK_R=block, **kwargs)
        return
    with torch.cuda.device(value.device) if value.is_cuda else contextlib.nullcontext():  # Triton uses the current one
        kernel[lambda meta: (triton.cdiv(num_rows, meta["BLOCK_R"]),)](*args, **kwargs)


class _MSDeformAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, locations, weights):  # type: ignore[override]
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        spatial_shapes, level_start_index = spatial_shapes.contiguous(), level_start_index.contiguous()
        batch, _, heads, head_dim = value.shape
        out = value.new_empty(batch, locations.shape[1], heads * head_dim)
        _launch(_msda_forward_kernel, value, locations, value, spatial_shapes, level_start_index, locations, weights, out)
        ctx.save_for_backward(value, spatial_shapes, level_start_index, locations, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        value, spatial_shapes, level_start_index, locations, weights = ctx.saved_tensors
        value_grad = ctx.needs_input_grad[0]
        # float32 accumulation buffer for the atomic adds (a dummy one-element tensor when not needed)
        grad_value = torch.zeros(value.shape if value_grad else (1,), dtype=torch.float32, device=value.device)
        grad_locations = torch.empty_like(locations)
        grad_weights = torch.empty_like(weights)
        _launch(
            _msda_backward_kernel, value, locations, value, spatial_shapes, level_start_index, locations, weights,
            grad_out.contiguous(), grad_value, grad_locations, grad_weights, VALUE_GRAD=value_grad,
        )
        return (
            grad_value.to(value.dtype) if value_grad else None,
            None,
            None,
            grad_locations if ctx.needs_input_grad[3] else None,
            grad_weights if ctx.needs_input_grad[4] else None,
        )


def ms_deform_attn_triton(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Fused multi-scale deformable sampling; arguments and result as
    :func:`focalnet_pl.layers.ms_deform_attn_sample` (``level_start_index`` required), output in ``value``'s
    dtype. Differentiable in ``value``, ``sampling_locations`` and ``attention_weights``."""
    return _MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)

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

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["INTERPRETED", "ms_deform_attn_triton"]

#: whether the kernels run through Triton's interpreter (``TRITON_INTERPRET=1``) rather than compiled
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


def _configs(heavy: bool) -> list[triton.Config]:
    blocks = (32, 64, 128) if heavy else (64, 128, 256)
    return [triton.Config({"BLOCK_R": block}, num_warps=warps) for block in blocks for warps in (2, 4, 8)]


@triton.jit
def _sampling_point(locations_ptr, weights_ptr, index, row_mask, height, width, start, value_rows, row_stride):
    """Bilinear setup of one sampling point for a block of rows: fractional offsets ``(lx, ly)``, the
    attention weight, the level's pixel scale, the element offset of the top-left corner's row and the
    inside masks of the corner columns ``x0``, ``x0 + 1`` and rows ``y0``, ``y0 + 1``."""
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
    corner = value_rows + (start + y0 * width + x0).to(tl.int64) * row_stride
    return x - x_low, y - y_low, weight, width_f, height_f, corner, left, right, top, bottom


@triton.jit
def _load_rows(value_ptr, offsets, mask, channels, d_mask):
    return tl.load(value_ptr + offsets[:, None] + channels[None, :], mask=mask[:, None] & d_mask[None, :],
                   other=0.0).to(tl.float32)


@triton.autotune(configs=_configs(heavy=False), key=["row_bucket", "HEADS", "HEAD_DIM", "LEVELS", "POINTS"])
@triton.jit
def _msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, out_ptr,
    num_rows, num_queries, num_tokens, row_bucket,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # A row is one (image, query, head): value (B, S, heads, D), locations (B, Q, heads, L, P, 2),
    # weights (B, Q, heads, L, P) and out (B, Q, heads * D) are all row-major in that order.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    channels = tl.arange(0, BLOCK_D)
    d_mask = channels < HEAD_DIM
    row_stride = HEADS * HEAD_DIM
    value_rows = ((rows // (num_queries * HEADS)) * num_tokens * HEADS + rows % HEADS) * HEAD_DIM
    acc = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for level in tl.static_range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in tl.static_range(POINTS):
            lx, ly, weight, _, _, corner, left, right, top, bottom = _sampling_point(
                locations_ptr, weights_ptr, rows * (LEVELS * POINTS) + level * POINTS + point, row_mask,
                height, width, start, value_rows, row_stride,
            )
            below = corner + width * row_stride
            v00 = _load_rows(value_ptr, corner, left & top, channels, d_mask)
            v01 = _load_rows(value_ptr, corner + row_stride, right & top, channels, d_mask)
            v10 = _load_rows(value_ptr, below, left & bottom, channels, d_mask)
            v11 = _load_rows(value_ptr, below + row_stride, right & bottom, channels, d_mask)
            upper = v00 + (v01 - v00) * lx[:, None]
            lower = v10 + (v11 - v10) * lx[:, None]
            acc += (upper + (lower - upper) * ly[:, None]) * weight[:, None]
    out_offsets = rows[:, None] * HEAD_DIM + channels[None, :]
    tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.autotune(configs=_configs(heavy=True), key=["row_bucket", "HEADS", "HEAD_DIM", "LEVELS", "POINTS"],
                 reset_to_zero=["grad_value_ptr"])
@triton.jit
def _msda_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, grad_out_ptr,
    grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    num_rows, num_queries, num_tokens, row_bucket,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, LEVELS: tl.constexpr, POINTS: tl.constexpr,
    VALUE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < num_rows
    channels = tl.arange(0, BLOCK_D)
    d_mask = channels < HEAD_DIM
    row_stride = HEADS * HEAD_DIM
    value_rows = ((rows // (num_queries * HEADS)) * num_tokens * HEADS + rows % HEADS) * HEAD_DIM
    grad_out = _load_rows(grad_out_ptr, rows * HEAD_DIM, row_mask, channels, d_mask)
    for level in tl.static_range(LEVELS):
        height = tl.load(shapes_ptr + 2 * level).to(tl.int32)
        width = tl.load(shapes_ptr + 2 * level + 1).to(tl.int32)
        start = tl.load(starts_ptr + level).to(tl.int32)
        for point in tl.static_range(POINTS):
            index = rows * (LEVELS * POINTS) + level * POINTS + point
            lx, ly, weight, width_f, height_f, corner, left, right, top, bottom = _sampling_point(
                locations_ptr, weights_ptr, index, row_mask, height, width, start, value_rows, row_stride,
            )
            hx = 1.0 - lx
            hy = 1.0 - ly
            below = corner + width * row_stride
            v00 = _load_rows(value_ptr, corner, left & top, channels, d_mask)
            v01 = _load_rows(value_ptr, corner + row_stride, right & top, channels, d_mask)
            v10 = _load_rows(value_ptr, below, left & bottom, channels, d_mask)
            v11 = _load_rows(value_ptr, below + row_stride, right & bottom, channels, d_mask)
            # d sample / d x and d y in pixels, and the sample itself
            d_x = (v01 - v00) * hy[:, None] + (v11 - v10) * ly[:, None]
            d_y = (v10 - v00) * hx[:, None] + (v11 - v01) * lx[:, None]
            sample = (v00 * hx[:, None] + v01 * lx[:, None]) * hy[:, None] + (v10 * hx[:, None] + v11 * lx[:, None]) * ly[:, None]
            grad_weight = tl.sum(grad_out * sample, axis=1)
            grad_x = tl.sum(grad_out * d_x, axis=1) * weight * width_f
            grad_y = tl.sum(grad_out * d_y, axis=1) * weight * height_f
            tl.store(grad_weights_ptr + index, grad_weight.to(grad_weights_ptr.dtype.element_ty), mask=row_mask)
            location_dtype = grad_locations_ptr.dtype.element_ty
            tl.store(grad_locations_ptr + 2 * index, grad_x.to(location_dtype), mask=row_mask)
            tl.store(grad_locations_ptr + 2 * index + 1, grad_y.to(location_dtype), mask=row_mask)
            if VALUE_GRAD:
                scaled = grad_out * weight[:, None]
                d_mask_2d = d_mask[None, :]
                tl.atomic_add(grad_value_ptr + corner[:, None] + channels[None, :], scaled * (hy * hx)[:, None],
                              mask=(left & top)[:, None] & d_mask_2d)
                tl.atomic_add(grad_value_ptr + (corner + row_stride)[:, None] + channels[None, :],
                              scaled * (hy * lx)[:, None], mask=(right & top)[:, None] & d_mask_2d)
                tl.atomic_add(grad_value_ptr + below[:, None] + channels[None, :], scaled * (ly * hx)[:, None],
                              mask=(left & bottom)[:, None] & d_mask_2d)
                tl.atomic_add(grad_value_ptr + (below + row_stride)[:, None] + channels[None, :],
                              scaled * (ly * lx)[:, None], mask=(right & bottom)[:, None] & d_mask_2d)


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
    )
    if INTERPRETED:
        block = min(triton.next_power_of_2(num_rows), 4096)
        kernel.fn[(triton.cdiv(num_rows, block),)](*args, BLOCK_R=block, **kwargs)
    else:
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

"""Multi-scale deformable attention against a hand-written per-point bilinear loop."""

from __future__ import annotations

import math

import pytest
import torch

from focalnet_pl.layers import (
    FusedKernel,
    MultiScaleDeformableAttention,
    get_fused_kernel,
    ms_deform_attn_sample,
    ms_deform_attn_sample_pytorch,
    register_fused_kernel,
)


def naive_sample(value, spatial_shapes, locations, weights):
    """Per batch, query, head, level and point: bilinear interpolation by hand, zeros outside the map."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, head_dim, dtype=value.dtype)
    start = 0
    starts = []
    for height, width in spatial_shapes.tolist():
        starts.append(start)
        start += height * width
    for b in range(batch):
        for q in range(queries):
            for h in range(heads):
                for lvl, (height, width) in enumerate(spatial_shapes.tolist()):
                    for p in range(points):
                        # align_corners=False: pixel centres sit at (i + 0.5) / size
                        x = locations[b, q, h, lvl, p, 0] * width - 0.5
                        y = locations[b, q, h, lvl, p, 1] * height - 0.5
                        x0, y0 = math.floor(x.detach()), math.floor(y.detach())
                        sample = torch.zeros(head_dim, dtype=value.dtype)
                        for dy in (0, 1):
                            for dx in (0, 1):
                                xi, yi = x0 + dx, y0 + dy
                                if 0 <= xi < width and 0 <= yi < height:
                                    corner_weight = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    sample = sample + corner_weight * value[b, starts[lvl] + yi * width + xi, h]
                        out[b, q, h] += weights[b, q, h, lvl, p] * sample
    return out.reshape(batch, queries, heads * head_dim)


def random_problem(dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor([[6, 5], [3, 4], [2, 2]], dtype=torch.long)
    length = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    batch, queries, heads, head_dim, levels, points = 2, 5, 2, 3, 3, 2
    value = torch.randn(batch, length, heads, head_dim, generator=gen, dtype=dtype)
    # include locations slightly outside [0, 1] to exercise zero padding
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen, dtype=dtype) * 1.2 - 0.1
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen, dtype=dtype)
    weights = weights / weights.sum((-1, -2), keepdim=True)
    return value, spatial_shapes, locations, weights


def test_pytorch_path_matches_naive_loop_float32_and_float64():
    for dtype in (torch.float32, torch.float64):
        value, shapes, locations, weights = random_problem(dtype)
        expected = naive_sample(value, shapes, locations, weights)
        got = ms_deform_attn_sample(value, shapes, locations, weights, use_fused=False)
        assert got.shape == (2, 5, 6)
        assert (got - expected).abs().max().item() <= 1e-5


def test_gradients_match_naive_loop():
    value, shapes, locations, weights = random_problem(torch.float64, seed=1)
    inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (value, locations, weights)]
    upstream = torch.randn(2, 5, 6, dtype=torch.float64)
    (ms_deform_attn_sample_pytorch(inputs[0], shapes, inputs[1], inputs[2]) * upstream).sum().backward()
    (naive_sample(ref_inputs[0], shapes, ref_inputs[1], ref_inputs[2]) * upstream).sum().backward()
    for got, ref in zip(inputs, ref_inputs):
        assert (got.grad - ref.grad).abs().max().item() <= 1e-5
    # and numerically (gradcheck) for the grid_sample path itself
    gc_value = value[:1, :, :1].clone().requires_grad_(True)
    gc_loc = locations[:1, :2, :1].clone().requires_grad_(True)
    gc_w = weights[:1, :2, :1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda v, loc, w: ms_deform_attn_sample_pytorch(v, shapes, loc, w), (gc_value, gc_loc, gc_w)
    )


def test_registered_fused_kernel_is_dispatched_and_fallback_stays():
    value, shapes, locations, weights = random_problem(torch.float32)
    calls = []

    def counting_kernel(v, s, starts, loc, w):
        calls.append(starts.tolist())
        return ms_deform_attn_sample_pytorch(v, s, loc, w)

    previous = register_fused_kernel(FusedKernel("counting", counting_kernel, device_types=("cpu",)))
    try:
        fused = ms_deform_attn_sample(value, shapes, locations, weights)
        assert calls == [[0, 30, 42]]
        fallback = ms_deform_attn_sample(value, shapes, locations, weights, use_fused=False)
        assert len(calls) == 1
        assert torch.allclose(fused, fallback)
        # a kernel that does not accept the dtype is skipped
        register_fused_kernel(FusedKernel("f64-only", counting_kernel, ("cpu",), (torch.float64,)))
        ms_deform_attn_sample(value, shapes, locations, weights)
        assert len(calls) == 1
    finally:
        register_fused_kernel(previous)
    assert get_fused_kernel() is previous


def test_shape_errors_are_explicit():
    value, shapes, locations, weights = random_problem(torch.float32)
    with pytest.raises(ValueError, match="cover 46 positions"):
        ms_deform_attn_sample(value[:, :-1], shapes, locations, weights)
    with pytest.raises(ValueError, match="attention_weights shape"):
        ms_deform_attn_sample(value, shapes, locations, weights[..., :1])
    with pytest.raises(ValueError, match="divisible"):
        MultiScaleDeformableAttention(embed_dim=30, num_heads=8)


def test_module_init_and_forward_with_points_boxes_and_padding():
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=16, num_heads=4, num_levels=2, num_points=3).double()
    # Deformable DETR init: zero offset weights, head directions on a ring, point k at radius k
    bias = module.sampling_offsets.bias.view(4, 2, 3, 2)
    assert torch.allclose(bias[0, 0, :, 0], torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    assert torch.allclose(bias[1, 0, 0], torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-6)
    assert module.attention_weights.weight.abs().sum() == 0

    shapes = torch.tensor([[4, 4], [2, 2]])
    value = torch.randn(2, 20, 16, dtype=torch.float64)
    query = torch.randn(2, 7, 16, dtype=torch.float64)
    points = torch.rand(2, 7, 2, 2, dtype=torch.float64)
    boxes = torch.cat([points, torch.full_like(points, 0.3)], -1)
    out_points = module(query, points, value, shapes)
    out_boxes = module(query, boxes, value, shapes)
    assert out_points.shape == out_boxes.shape == (2, 7, 16)

    # padded positions contribute nothing: changing their content leaves the output unchanged
    padding = torch.zeros(2, 20, dtype=torch.bool)
    padding[1, 12:16] = True
    altered = value.clone()
    altered[1, 12:16] = 100.0
    assert torch.allclose(module(query, points, value, shapes, None, padding),
                          module(query, points, altered, shapes, None, padding))

    # the module equals projection -> naive sampling -> projection
    with torch.no_grad():
        projected = module.value_proj(value).view(2, 20, 4, 4)
        offsets = module.sampling_offsets(query).view(2, 7, 4, 2, 3, 2)
        attn = module.attention_weights(query).view(2, 7, 4, 6).softmax(-1).view(2, 7, 4, 2, 3)
        normalizer = torch.tensor([[4.0, 4.0], [2.0, 2.0]], dtype=torch.float64)
        locations = points[:, :, None, :, None] + offsets / normalizer[None, None, None, :, None]
        expected = module.output_proj(naive_sample(projected, shapes, locations, attn))
        assert (module(query, points, value, shapes) - expected).abs().max().item() <= 1e-5

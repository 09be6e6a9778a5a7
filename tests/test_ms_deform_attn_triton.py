"""The Triton deformable-attention kernel against the PyTorch path, on CPU through Triton's interpreter.

``TRITON_INTERPRET=1`` must be set before Triton is imported, so the checks run in one subprocess with
that environment (this file is its script) and report their largest differences as JSON; the tests
below assert on them. Float32: forward and the three gradients to 1e-5 (absolute and relative);
bfloat16: to 1% of the largest reference magnitude. The shapes are small and odd on purpose: level maps of 6x5 ... 1x1, head
widths that are not powers of two, query counts that leave a partial block, sampling points on and
far outside the map borders, padded values, and a few DINO training steps.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FLOAT32 = {"atol": 1e-5, "rtol": 1e-5}
BFLOAT16 = 1e-2  # of the largest reference magnitude: bf16 keeps 8 bits of mantissa


# ---- checks, run in the interpreter subprocess -------------------------------------------------------------
def _problem(shapes, batch, queries, heads, head_dim, points, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    levels = len(shapes)
    value = torch.randn(batch, tokens, heads, head_dim, generator=gen)
    locations = torch.rand(batch, queries, heads, levels, points, 2, generator=gen) * 1.4 - 0.2
    flat = locations.view(-1, 2)
    flat[::7] = torch.tensor([-3.0, 5.0])  # far outside
    flat[1::11] = torch.tensor([0.0, 1.0])  # on the borders
    flat[2::13] = torch.tensor([1.0, 0.0])
    weights = torch.rand(batch, queries, heads, levels, points, generator=gen).softmax(-1)
    return value.to(dtype), spatial_shapes, locations.to(dtype), weights.to(dtype)


def _max_diffs(got, expected) -> dict[str, float]:
    """Largest absolute difference, largest difference relative to ``|expected|`` (beyond 1e-5 absolute)
    and the largest ``|expected|``."""
    diff = (got.float() - expected.float()).abs()
    excess = (diff - 1e-5).clamp(min=0) / expected.float().abs().clamp(min=1e-12)
    return {"abs": diff.max().item(), "rel": excess.max().item(), "scale": expected.abs().max().item()}


def _compare_sampling(value, shapes, locations, weights, reference_dtype=torch.float32, value_grad=True):
    from focalnet_pl.layers import ms_deform_attn_sample, ms_deform_attn_sample_pytorch

    inputs = [value.clone().requires_grad_(value_grad), locations.clone().requires_grad_(),
              weights.clone().requires_grad_()]
    reference = [t.detach().to(reference_dtype).requires_grad_(t.requires_grad) for t in inputs]
    fused = ms_deform_attn_sample(*inputs[:1], shapes, *inputs[1:])
    expected = ms_deform_attn_sample_pytorch(reference[0], shapes, *reference[1:])
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=reference_dtype)
    (fused.float() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    result = {"output": _max_diffs(fused, expected), "dtype": str(fused.dtype)}
    for name, got, ref in zip(("grad_value", "grad_locations", "grad_weights"), inputs, reference):
        if got.requires_grad:
            result[name] = _max_diffs(got.grad, ref.grad)
    return result


def _module_with_padding() -> dict:
    """The module (points and boxes, padded value) with the fused kernel vs without, float32."""
    from focalnet_pl.layers import MultiScaleDeformableAttention, get_fused_kernel, register_fused_kernel

    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dim=24, num_heads=3, num_levels=3, num_points=2)
    for parameter in module.parameters():  # trained-like: non-zero offsets and attention logits
        parameter.data.add_(0.3 * torch.randn_like(parameter))
    shapes = torch.tensor([[5, 7], [3, 4], [1, 2]])
    value = torch.randn(2, 49, 24)
    query = torch.randn(2, 9, 24)
    padding = torch.zeros(2, 49, dtype=torch.bool)
    padding[1, 30:35] = padding[1, 47:] = True
    results = {}
    for kind, reference_points in (("points", torch.rand(2, 9, 3, 2)),
                                   ("boxes", torch.cat([torch.rand(2, 9, 3, 2), torch.rand(2, 9, 3, 2) * 0.5], -1))):
        outputs, grads = [], []
        kernel = get_fused_kernel()
        for fused in (True, False):
            previous = register_fused_kernel(kernel if fused else None)
            module.zero_grad()
            out = module(query, reference_points, value, shapes, None, padding)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            register_fused_kernel(previous)
            outputs.append(out)
            grads.append(torch.cat([p.grad.flatten() for p in module.parameters()]))
        results[kind] = {"output": _max_diffs(*outputs), "grad_parameters": _max_diffs(*grads)}
    return results


def _dino_steps(steps: int = 3) -> dict:
    """A few SGD steps of a tiny DINO with the fused kernel and with the PyTorch path: losses and first gradients.

    (SGD, since Adam's first steps move every weight by about ``lr * sign(grad)``: where a gradient is at
    rounding level, as for zero-initialised heads, any change of summation order flips such updates.)"""
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    from focalnet_pl.d2 import build_detectron2_cfg
    from focalnet_pl.layers import get_fused_kernel, register_fused_kernel

    cfg = build_detectron2_cfg({"MODEL": {
        "META_ARCHITECTURE": "DINO", "DEVICE": "cpu", "BACKBONE": {"NAME": "build_focalnet_backbone"},
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
        "DINO": {"NUM_CLASSES": 2, "HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2,
                 "DIM_FEEDFORWARD": 64, "NUM_QUERIES": 20, "DN_NUMBER": 10, "NUM_FEATURE_LEVELS": 4,
                 "IN_FEATURES": ["res3", "res4", "res5"], "NUM_SELECT": 10, "DROPOUT": 0.0},
    }})
    batch = []
    for boxes, classes, size in (([[8, 10, 30, 40], [40, 36, 60, 60]], [0, 1], (64, 80)), ([[20, 6, 52, 26]], [1], (72, 56))):
        instances = Instances(size)
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32))
        instances.gt_classes = torch.tensor(classes)
        image = torch.rand(3, *size, generator=torch.Generator().manual_seed(len(boxes))) * 255
        batch.append({"image": image, "instances": instances})
    kernel = get_fused_kernel()
    history, first_gradients = {}, {}
    for name, fused in (("fused", kernel), ("pytorch", None)):
        previous = register_fused_kernel(fused)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        for parameter in model.parameters():
            # trained-like weights: at init every encoder sampling point sits exactly on a pixel centre, where
            # bilinear interpolation has no derivative and rounding alone picks the one-sided one
            parameter.data.add_(0.02 * torch.randn_like(parameter))
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        history[name] = []
        for step in range(steps):
            losses = model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            if step == 0:
                first_gradients[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            optimizer.step()
            history[name].append({key: value.item() for key, value in losses.items()})
        register_fused_kernel(previous)
    diffs = [max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-3) for key in b)
             for a, b in zip(history["fused"], history["pytorch"])]
    return {"max_relative_loss_diff_per_step": diffs, "steps": steps, "num_losses": len(history["fused"][0]),
            "first_gradients": _max_diffs(first_gradients["fused"], first_gradients["pytorch"])}


def run_checks() -> dict:
    from focalnet_pl.layers import get_fused_kernel
    from focalnet_pl.layers.ms_deform_attn_triton import INTERPRETED

    assert INTERPRETED and get_fused_kernel().name == "triton", "run with TRITON_INTERPRET=1 FOCALNET_PL_MSDA=triton"
    odd_levels = [(6, 5), (3, 4), (2, 2), (1, 3), (1, 1)]
    return {
        "float32_odd": _compare_sampling(*_problem(odd_levels, 2, 70, 3, 5, 3, seed=0)),
        "float32_one_level_one_point": _compare_sampling(*_problem([(7, 3)], 1, 9, 1, 8, 1, seed=1)),
        "float32_dino_like": _compare_sampling(*_problem([(8, 6), (4, 3), (2, 2), (1, 1)], 1, 33, 8, 4, 4, seed=2)),
        "float32_no_value_grad": _compare_sampling(*_problem(odd_levels[:3], 1, 20, 2, 6, 2, seed=3),
                                                   value_grad=False),
        "bfloat16": _compare_sampling(*_problem(odd_levels, 2, 40, 2, 8, 2, seed=4, dtype=torch.bfloat16)),
        "bfloat16_value_float32_rest": _compare_sampling(
            *(t.to(torch.bfloat16) if i == 0 else t for i, t in enumerate(_problem(odd_levels, 1, 40, 2, 8, 2, seed=5)))
        ),
        "module": _module_with_padding(),
        "dino": _dino_steps(),
    }


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", FOCALNET_PL_MSDA="triton", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _within(diffs: dict[str, float], tolerance: dict[str, float]) -> bool:
    return diffs["abs"] <= tolerance["atol"] or diffs["rel"] <= tolerance["rtol"]


@pytest.mark.slow
@pytest.mark.parametrize("case", ["float32_odd", "float32_one_level_one_point", "float32_dino_like",
                                  "float32_no_value_grad"])
def test_float32_forward_and_gradients_match_pytorch_path(interpreted, case):
    result = interpreted[case]
    assert result["dtype"] == "torch.float32"
    expected = {"output", "grad_locations", "grad_weights"} | ({"grad_value"} if case != "float32_no_value_grad" else set())
    assert set(result) - {"dtype"} == expected
    for name in expected:
        assert _within(result[name], FLOAT32), (case, name, result[name])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bfloat16", "bfloat16_value_float32_rest"])
def test_bfloat16_matches_float32_reference_to_bf16_rounding(interpreted, case):
    result = interpreted[case]
    assert result["dtype"] == "torch.bfloat16"
    for name in ("output", "grad_value", "grad_locations", "grad_weights"):
        assert result[name]["abs"] <= BFLOAT16 * result[name]["scale"], (case, name, result[name])


@pytest.mark.slow
def test_module_with_padding_mask_points_and_boxes(interpreted):
    for kind in ("points", "boxes"):
        for name, diffs in interpreted["module"][kind].items():
            assert _within(diffs, FLOAT32), (kind, name, diffs)


@pytest.mark.slow
def test_dino_training_steps_give_the_same_losses(interpreted):
    result = interpreted["dino"]
    assert result["steps"] == 3 and result["num_losses"] > 10
    assert result["max_relative_loss_diff_per_step"][0] < 1e-5, result
    assert max(result["max_relative_loss_diff_per_step"]) < 5e-4, result
    assert _within(result["first_gradients"], {"atol": 1e-5, "rtol": 1e-4}), result


def test_forcing_triton_on_cpu_without_interpreter_is_a_clear_error():
    from focalnet_pl.layers import ms_deform_attn_sample, register_fused_kernel, triton_kernel
    from focalnet_pl.layers import ms_deform_attn_triton

    if ms_deform_attn_triton.INTERPRETED:
        pytest.skip("this process runs Triton interpreted")
    previous = register_fused_kernel(triton_kernel(("cpu",)))
    try:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ms_deform_attn_sample(*_problem([(2, 2)], 1, 3, 1, 4, 1, seed=0))
    finally:
        register_fused_kernel(previous)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kernels_compile_for_a_hopper_gpu_without_one(dtype):
    """The compiled path, which the interpreter does not exercise: both kernels through Triton's whole
    pipeline (frontend, LLVM, ptxas) to sm_90 machine code, with vector loads of a head's channels."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from focalnet_pl.layers import ms_deform_attn_triton as kernels

    if kernels.INTERPRETED:
        pytest.skip("this process runs Triton interpreted")
    sizes = {"HEADS": 8, "HEAD_DIM": 32, "LEVELS": 4, "POINTS": 4, "BLOCK_D": 32, "WIDE": False, "ALIGN": 32}
    pointers = {"value_ptr": dtype, "shapes_ptr": "i64", "starts_ptr": "i64", "locations_ptr": "fp32",
                "weights_ptr": "fp32", "out_ptr": dtype, "grad_out_ptr": dtype, "grad_value_ptr": "fp32",
                "grad_locations_ptr": "fp32", "grad_weights_ptr": "fp32"}
    for kernel, constants in ((kernels._msda_forward_kernel, {"BLOCK_R": 64}),
                              (kernels._msda_backward_kernel, {"BLOCK_R": 32, "VALUE_GRAD": True})):
        names = kernel.fn.arg_names
        constants = {**sizes, **constants}
        signature = {name: "constexpr" if name in constants else f"*{pointers[name]}" if name in pointers else "i32"
                     for name in names}
        aligned = {(index,): [["tt.divisibility", 16]] for index, name in enumerate(names) if name in pointers}
        source = ASTSource(fn=kernel.fn, signature=signature, constexprs=constants, attrs=aligned)
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
        except RuntimeError as error:  # no ptxas in this Triton installation
            pytest.skip(f"cannot compile for sm_90 here: {error}")
        assert "ld.global.v" in compiled.asm["ptx"] and compiled.asm["cubin"]


def test_bad_kernel_choice_is_named():
    from focalnet_pl.layers.ms_deform_attn import _default_fused_kernel

    with pytest.raises(ValueError, match="FOCALNET_PL_MSDA='cuda'"):
        _default_fused_kernel("cuda")
    assert _default_fused_kernel("pytorch") is None
    assert _default_fused_kernel("auto").device_types == ("cuda",)  # never on CPU tensors unless forced


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_checks()))

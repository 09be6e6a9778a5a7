"""bf16 autocast: the float32 islands (focalnet_pl.layers.precision) keep DINO and Mask2Former finite and
close to float32; float32 results are unchanged (the parity tests check them bit for bit)."""
from __future__ import annotations

import copy

import torch
from detectron2.modeling import build_model

from focalnet_pl.d2.config import build_detectron2_cfg
from focalnet_pl.layers import MultiScaleDeformableAttention, ms_deform_attn_sample, spatial_shapes_tensor
from focalnet_pl.layers.precision import float32, run_in_float32
from helpers import scene, scene_batch, tiny_dino_cfg, tiny_mask2former

BF16 = {"device_type": "cpu", "dtype": torch.bfloat16}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Trained-like weights: zero-initialised heads would hide differences."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


def _losses(model: torch.nn.Module, batch: list[dict], bf16: bool, steps: int = 3) -> list[dict[str, torch.Tensor]]:
    """Losses of ``steps`` SGD steps from ``model``'s weights (the same random draws in both precisions)."""
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    history = []
    for step in range(steps):
        torch.manual_seed(100 + step)
        with torch.autocast(**BF16, enabled=bf16):
            losses = model(batch)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({name: value.detach() for name, value in losses.items()})
    return history


def _assert_losses_close(model: torch.nn.Module, batch: list[dict], rtol: float) -> None:
    for reference, mixed in zip(_losses(model, batch, False), _losses(model, batch, True), strict=True):
        assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in mixed.values())
        total, total_mixed = sum(reference.values()), sum(mixed.values())
        assert abs(total_mixed - total) <= rtol * total, (float(total), float(total_mixed))


def _eval(model: torch.nn.Module, run, bf16: bool):
    with torch.no_grad(), torch.autocast(**BF16, enabled=bf16):
        return run(model.eval())


def test_dino_bf16_steps_are_finite_and_close_to_float32(one_thread) -> None:
    """Measured: total loss within 0.7% of float32 over 3 steps (bf16 keeps ~3 significant digits in every
    backbone / transformer matmul; the two-stage proposal selection may then pick other proposals). With
    fixed queries (one-stage), last-layer logits within 0.032 and normalised boxes within 2e-4."""
    torch.manual_seed(0)
    batch = [scene([(8, 10, 30, 40), (40, 36, 60, 60)], [0, 1]), scene([(20, 6, 52, 26)], [1])]
    _assert_losses_close(_perturbed(build_model(tiny_dino_cfg())), batch, rtol=0.02)

    one_stage = _perturbed(build_model(tiny_dino_cfg(TWO_STAGE=False, NUM_FEATURE_LEVELS=4,
                                                 IN_FEATURES=["res2", "res3", "res4", "res5"])))
    reference, mixed = (_eval(one_stage, lambda m: m.predict(batch)[0], bf16) for bf16 in (False, True))
    torch.testing.assert_close(mixed.logits[-1].float(), reference.logits[-1], rtol=0, atol=0.1)
    torch.testing.assert_close(mixed.boxes[-1], reference.boxes[-1], rtol=0, atol=1e-3)
    for output in _eval(one_stage, lambda m: m(batch), bf16=True):
        instances = output["instances"]  # float32 scores: no bf16 ties in the top-k
        assert instances.scores.dtype == instances.pred_boxes.tensor.dtype == torch.float32
        assert torch.isfinite(instances.pred_boxes.tensor).all()


def test_mask2former_bf16_steps_are_finite_and_close_to_float32() -> None:
    """Measured: total loss within 0.3% of float32 over 3 steps; semantic scores (probabilities) within 0.06,
    the same panoptic segments."""
    torch.manual_seed(0)
    model = _perturbed(build_model(build_detectron2_cfg(tiny_mask2former(3, [0]))))
    batch = scene_batch()
    _assert_losses_close(model, batch, rtol=0.02)
    outputs, outputs_bf16 = (_eval(model, lambda m: m(batch), bf16) for bf16 in (False, True))
    for output, output_bf16 in zip(outputs, outputs_bf16):
        assert output_bf16["sem_seg"].dtype == torch.float32
        torch.testing.assert_close(output_bf16["sem_seg"], output["sem_seg"], rtol=0, atol=0.1)
        segments, segments_bf16 = output["panoptic_seg"][1], output_bf16["panoptic_seg"][1]
        assert [s["category_id"] for s in segments_bf16] == [s["category_id"] for s in segments]


def test_criteria_compute_in_float32_under_autocast(one_thread) -> None:
    """Under bf16 autocast the losses equal the float32 computation on the same (bf16) network outputs."""
    torch.manual_seed(0)
    for model, batch in ((_perturbed(build_model(tiny_dino_cfg())), [scene([(8, 10, 30, 40)], [0])]),
                         (_perturbed(build_model(build_detectron2_cfg(tiny_mask2former(3, [0])))), scene_batch())):
        criterion = model.criterion
        captured = []
        original = criterion.forward
        criterion.forward = lambda *args: captured.append((args, torch.get_rng_state())) or original(*args)
        with torch.autocast(**BF16):
            losses = model(batch)
        args, random_state = captured[0]
        assert args[0]["pred_logits"].dtype == torch.bfloat16
        torch.set_rng_state(random_state)  # the same point draws (Mask2Former)
        reference = type(criterion).forward.__wrapped__(criterion, *float32(args))  # plain float32
        weights = getattr(criterion, "weight_dict", None)
        for name, value in reference.items():
            expected = value * weights[name] if weights is not None else value
            assert losses[name].dtype == torch.float32
            torch.testing.assert_close(losses[name], expected, rtol=0, atol=0)


def test_deformable_attention_samples_in_float32() -> None:
    torch.manual_seed(0)
    attention = MultiScaleDeformableAttention(embed_dim=16, num_heads=2, num_levels=2, num_points=2)
    with torch.no_grad():
        for parameter in attention.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    shapes = spatial_shapes_tensor([(6, 8), (3, 4)])
    query, value = torch.randn(1, 5, 16), torch.randn(1, 60, 16)
    reference_points = torch.rand(1, 5, 2, 2)
    seen = []
    attention.output_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.autocast(**BF16):
        output = attention(query, reference_points, value, shapes)
    assert torch.isfinite(output).all() and seen[0].dtype == torch.bfloat16  # value's dtype, as a fused kernel
    # the PyTorch path samples float32 copies: bf16 inputs give the float32 result rounded once
    value_bf16 = torch.randn(1, 60, 2, 8).bfloat16()
    locations, weights = torch.rand(1, 5, 2, 2, 2, 2), torch.rand(1, 5, 2, 2, 2).softmax(-1)
    with torch.autocast(**BF16):
        sampled = ms_deform_attn_sample(value_bf16, shapes, locations, weights, use_fused=False)
    expected = ms_deform_attn_sample(value_bf16.float(), shapes, locations, weights, use_fused=False)
    torch.testing.assert_close(sampled, expected.bfloat16(), rtol=0, atol=0)


def test_run_in_float32_casts_half_tensors_only() -> None:
    @run_in_float32
    def dtypes(tensors: dict, scale: float) -> list[torch.dtype]:
        return [t.dtype for t in tensors["list"]] + [(tensors["pair"][0] @ tensors["pair"][0]).dtype, type(scale)]

    half = torch.ones(2, 2, dtype=torch.bfloat16)
    with torch.autocast(**BF16):
        result = dtypes({"list": [half, torch.ones(2, dtype=torch.float64), torch.ones(2, dtype=torch.long)],
                         "pair": (half, 1)}, 2.0)
    assert result == [torch.float32, torch.float64, torch.long, torch.float32, float]

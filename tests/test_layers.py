"""The shared transformer pieces of focalnet_pl.layers: what each computes, and the older parameter names
of our own checkpoints (from before the pieces were shared) still loading."""

from __future__ import annotations

import torch
from torch import nn

from focalnet_pl import load_detector_weights
from focalnet_pl.layers import (
    MLP,
    DeformableEncoderLayer,
    PixelNormalization,
    encoder_reference_points,
    level_starts,
    spatial_shapes_tensor,
    valid_ratios,
)


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mask_embed = MLP(8, 8, 4, 3)
        self.encoder_layers = nn.ModuleList([DeformableEncoderLayer(8, 16, 0.0, 2, 2, 2)])


def _legacy_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` as Mask2Former's modules named it before: Sequential MLP, ``attention`` in the encoder."""
    legacy = {}
    for key, value in state.items():
        if key.startswith("mask_embed.layers."):
            index, rest = key.removeprefix("mask_embed.layers.").split(".", 1)
            key = f"mask_embed.{2 * int(index)}.{rest}"
        legacy[key.replace(".self_attn.", ".attention.")] = value.clone()
    return legacy


def test_checkpoints_with_the_older_names_load() -> None:
    saved = _Head()
    with torch.no_grad():
        for parameter in saved.parameters():
            parameter.normal_()
    legacy = _legacy_names(saved.state_dict())
    assert "mask_embed.2.weight" in legacy and "encoder_layers.0.attention.value_proj.weight" in legacy

    for how in ("load_state_dict", "load_detector_weights"):
        model = _Head()
        if how == "load_state_dict":
            model.load_state_dict(legacy)
        else:
            report = load_detector_weights(model, {"state_dict": {f"model.{k}": v for k, v in legacy.items()}})
            assert not report.problems()
        for key, value in saved.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (how, key)


def test_mlp_has_relu_between_layers_only() -> None:
    mlp = MLP(3, 5, 2, 2)
    x = torch.randn(4, 3)
    expected = mlp.layers[1](torch.relu(mlp.layers[0](x)))
    assert torch.equal(mlp(x), expected)
    assert (mlp(x) < 0).any()  # no ReLU after the last layer


def test_reference_points_and_level_starts() -> None:
    shapes = spatial_shapes_tensor([(2, 4), (1, 2)])
    assert level_starts(shapes).tolist() == [0, 8]
    padding = torch.zeros(1, 2, 4, dtype=torch.bool)
    padding[:, :, 2:] = True  # the image covers the left half
    ratios = torch.stack([valid_ratios(padding), torch.ones(1, 2)], 1)
    assert ratios[0, 0].tolist() == [0.5, 1.0]
    points = encoder_reference_points(shapes, ratios)
    assert points.shape == (1, 10, 2, 2)
    # first pixel centre of level 0: (0.5 / 2 valid columns, 0.5 / 2 rows), seen from level 0 (x scaled by 0.5)
    assert torch.allclose(points[0, 0, 0], torch.tensor([0.125, 0.25]))
    assert torch.allclose(points[0, 0, 1], torch.tensor([0.25, 0.25]))
    # the last level's single row: y at its centre whatever the level
    assert torch.allclose(points[0, 8:, :, 1], torch.full((2, 2), 0.5))


def test_pixel_normalization_equals_float32_constants() -> None:
    mean, std = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]
    image = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    expected = (image - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)
    normalize = PixelNormalization(mean, std)
    assert torch.equal(normalize(image), expected)
    assert normalize(image, torch.float64).dtype == torch.float64
    assert not normalize.state_dict()  # constants of the config, not weights

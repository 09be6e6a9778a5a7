"""The fused oneDNN inference path gives the plain layers' numbers and is taken only at CPU inference."""
import pytest
import torch

from focalnet_pl import create_focalnet
from focalnet_pl.layers import onednn

pytestmark = pytest.mark.skipif(not onednn.AVAILABLE, reason="PyTorch built without oneDNN")


@pytest.fixture
def counted_linear(monkeypatch):
    monkeypatch.setattr(onednn, "MAX_CHANNELS", 10**6)  # fuse every stage
    calls = []
    original = onednn.linear

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(onednn, "linear", counting)
    return calls


@pytest.mark.parametrize("overrides", [
    {},
    {"use_postln": True, "use_layerscale": True, "use_postln_in_modulation": True, "normalize_modulator": True},
])
def test_fused_inference_matches_plain_layers(counted_linear, overrides):
    torch.manual_seed(0)
    model = create_focalnet("focalnet_tiny_lrf", num_classes=7, embed_dim=32, depths=(1, 1, 2, 1), **overrides).eval()
    for p in model.parameters():  # non-trivial biases and gates
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        onednn.set_enabled(False)
        try:
            plain = model(x)
        finally:
            onednn.set_enabled(True)
        assert not counted_linear
        fused = model(x)
    assert counted_linear, "the fused path was not taken"
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_training_and_autograd_take_the_plain_path(counted_linear):
    model = create_focalnet("focalnet_tiny_srf", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)  # training mode: dropout / drop path semantics stay with the plain layers
    model.eval()
    model(x).sum().backward()  # gradients needed
    assert not counted_linear
    assert model.head.weight.grad is not None


def test_only_narrow_blocks_take_the_fused_path(counted_linear, monkeypatch):
    monkeypatch.setattr(onednn, "MAX_CHANNELS", 16)
    model = create_focalnet("focalnet_tiny_srf", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1)).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert len(counted_linear) == 5  # the 16-channel stage only: f, h, proj, fc1, fc2

"""The chunked CPU inference path gives the plain forward's numbers and is taken only at CPU inference."""
import pytest
import torch

from focalnet_pl import cpu_fastpath, create_focalnet


@pytest.fixture
def chunked_calls(monkeypatch):
    calls = []
    original = cpu_fastpath.block_forward

    def counting(block, x):
        calls.append(x.shape)
        return original(block, x)

    monkeypatch.setattr(cpu_fastpath, "block_forward", counting)
    return calls


def _perturbed_model(**overrides):
    torch.manual_seed(0)
    model = create_focalnet("focalnet_tiny_lrf", num_classes=7, embed_dim=32, depths=(1, 1, 2, 1), **overrides).eval()
    for p in model.parameters():  # non-trivial biases, gates and layerscales
        p.data.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("onednn_conv", [True, False] if cpu_fastpath.ONEDNN_CONV else [False])
@pytest.mark.parametrize("overrides", [
    {},
    {"use_postln": True, "use_layerscale": True, "use_postln_in_modulation": True, "normalize_modulator": True},
])
def test_chunked_inference_matches_plain_forward(chunked_calls, monkeypatch, overrides, onednn_conv):
    monkeypatch.setattr(cpu_fastpath, "ONEDNN_CONV", onednn_conv)
    monkeypatch.setattr(cpu_fastpath, "CHUNK_TOKENS", 37)  # chunks straddle image boundaries
    model = _perturbed_model(**overrides)
    x = torch.randn(3, 3, 64, 80)
    with torch.no_grad():
        with cpu_fastpath.disabled():
            plain = model(x)
        assert not chunked_calls
        chunked = model(x)
    assert len(chunked_calls) == 5, "every block should take the chunked path"
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)


def test_dense_backbone_features_match(chunked_calls):
    torch.manual_seed(0)
    model = create_focalnet("focalnet_tiny_srf", features_only=True, embed_dim=16, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, 70, 50)  # padded internally
    with torch.no_grad():
        chunked = model(x)
        with cpu_fastpath.disabled():
            plain = model(x)
    assert chunked_calls
    for a, b in zip(chunked, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_training_autograd_and_map_recording_take_the_plain_path(chunked_calls):
    model = create_focalnet("focalnet_tiny_srf", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1))
    x = torch.randn(1, 3, 32, 32)
    model.train()
    with torch.no_grad():
        model(x)  # training mode: dropout / drop path semantics stay with the plain layers
    model.eval()
    model(x).sum().backward()  # gradients needed
    assert model.head.weight.grad is not None
    modulation = model.layers[0].blocks[0].modulation
    modulation.record_maps = True
    with torch.no_grad():
        model(x)
    assert modulation.last_gates is not None
    assert len(chunked_calls) == 3  # only the three blocks that do not record maps


def test_hooks_and_replaced_layers_take_the_plain_path(chunked_calls):
    model = create_focalnet("focalnet_tiny_srf", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 32, 32)
    seen = []
    block = model.layers[0].blocks[0]
    handle = block.modulation.f.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert seen == [(1, 8, 8, 2 * 16 + 3)]  # the hook saw f's output
    assert len(chunked_calls) == 3  # the other blocks

    class Adapter(torch.nn.Linear):  # stands in for a LoRA-style wrapper
        def forward(self, x):
            return super().forward(x) + 1.0

    adapter = Adapter(16, 64)
    adapter.load_state_dict(block.mlp.fc1.state_dict())
    block.mlp.fc1 = adapter
    with torch.no_grad():
        adapted = model(x)
        with cpu_fastpath.disabled():
            plain = model(x)
    torch.testing.assert_close(adapted, plain)
    assert len(chunked_calls) == 6


def test_focal_projection_gradients():
    torch.manual_seed(0)
    dim, levels = 5, 2
    tokens = torch.randn(7, dim, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2 * dim + levels + 1, dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(2 * dim + levels + 1, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, w, b: cpu_fastpath.FocalProjection.apply(t, w, b, dim), (tokens, weight, bias))
    outputs = cpu_fastpath.FocalProjection.apply(tokens.detach(), weight, bias, dim)  # no gradient for the tokens
    sum(o.sum() for o in outputs).backward()
    assert weight.grad is not None and bias.grad is not None


def test_training_gradients_match_the_plain_path(monkeypatch):
    calls = []
    original = cpu_fastpath.FocalProjection.apply
    monkeypatch.setattr(cpu_fastpath.FocalProjection, "apply", lambda *a: calls.append(1) or original(*a))
    model = _perturbed_model(use_layerscale=True, normalize_modulator=True).train()
    x = torch.randn(2, 3, 48, 40)
    target = torch.tensor([1, 5])

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)  # same drop-path draws
        torch.nn.functional.cross_entropy(model(x), target).backward()
        return [p.grad.clone() for p in model.parameters()]

    fast = gradients()
    assert len(calls) == 5
    with cpu_fastpath.disabled():
        plain = gradients()
    assert len(calls) == 5
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

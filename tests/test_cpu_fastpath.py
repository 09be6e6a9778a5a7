"""The chunked CPU inference path gives the plain forward's numbers and is taken only at CPU inference; in
``auto`` mode each path is chosen by measuring it."""
import pytest
import torch

from focalnet_pl import cpu_fastpath, create_focalnet


@pytest.fixture(autouse=True)
def fast_paths_on():
    """The tests below check where the fast paths may apply: take them without measuring (the tests of
    ``auto`` mode switch to it)."""
    previous = cpu_fastpath.set_mode("on")
    yield
    cpu_fastpath.set_mode(previous)


@pytest.fixture
def chunked_calls(monkeypatch):
    calls = []
    original = cpu_fastpath.block_forward

    def counting(block, x, **kwargs):
        calls.append(x.shape)
        return original(block, x, **kwargs)

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


def _gradient_function(model):
    """A function giving ``model``'s parameter gradients on a fixed batch (same drop-path draws each call)."""
    x = torch.randn(2, 3, 48, 40)
    target = torch.tensor([1, 5])

    def gradients():
        model.zero_grad()
        torch.manual_seed(1)
        torch.nn.functional.cross_entropy(model(x), target).backward()
        return [p.grad.clone() for p in model.parameters()]

    return gradients


def test_training_gradients_match_the_plain_path(monkeypatch):
    calls = []
    original = cpu_fastpath.FocalProjection.apply
    monkeypatch.setattr(cpu_fastpath.FocalProjection, "apply", lambda *a: calls.append(1) or original(*a))
    model = _perturbed_model(use_layerscale=True, normalize_modulator=True).train()
    gradients = _gradient_function(model)
    fast = gradients()
    assert len(calls) == 5
    with cpu_fastpath.disabled():
        plain = gradients()
    assert len(calls) == 5
    for a, b in zip(fast, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.fixture
def calibrating(monkeypatch):
    """``auto`` mode with fresh decisions and a fake clock under which every run takes ``costs[candidate]``."""
    cpu_fastpath.set_mode("auto")
    monkeypatch.setattr(cpu_fastpath, "_decisions", {})
    monkeypatch.setattr(cpu_fastpath, "_timings", {})
    costs, clock, runs = {}, [0.0], []

    def fake_calibrated(key, candidates):
        def timed(name, run):
            def wrapped():
                runs.append(name)
                run()
                clock[0] += costs.get(name, 1.0)
            return wrapped
        return original(key, {name: timed(name, run) for name, run in candidates.items()})

    original = cpu_fastpath._calibrated
    monkeypatch.setattr(cpu_fastpath, "_calibrated", fake_calibrated)
    monkeypatch.setattr(cpu_fastpath.time, "perf_counter", lambda: clock[0])
    return costs, runs


@pytest.mark.parametrize("fastest", ["plain", "chunked", "chunked+onednn"])
def test_auto_mode_measures_once_per_shape_class_and_keeps_the_fastest(calibrating, chunked_calls, fastest):
    costs, runs = calibrating
    if fastest == "chunked+onednn" and not cpu_fastpath.ONEDNN_CONV:
        pytest.skip("no oneDNN convolution in this build")
    costs.update({"plain": 2.0, "chunked": 2.0, "chunked+onednn": 2.0, fastest: 1.0})
    blocks = {"plain", "chunked", "chunked+onednn"}
    model = _perturbed_model()
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        with cpu_fastpath.disabled():
            plain = model(x)
        first = model(x)
        calibrations, chunked_before = len(runs), len(chunked_calls)
        second = model(x)
    candidates = 3 if cpu_fastpath.ONEDNN_CONV else 2
    # one calibration per stage (each stage is its own shape class): warm-up + repeats of every candidate
    assert sum(name in blocks for name in runs) == 4 * candidates * (1 + cpu_fastpath.CALIBRATION_REPEATS)
    assert len(runs) == calibrations  # remembered: the second forward measured nothing
    block_choices = {line.rsplit("-> ", 1)[1] for line in cpu_fastpath.calibration_report() if line.startswith("block")}
    assert block_choices == {fastest}
    assert (len(chunked_calls) > chunked_before) == (fastest != "plain")  # the second forward took the choice
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fastest", ["linear", "three GEMMs"])
def test_auto_mode_projection_choice_leaves_gradients_alone(calibrating, fastest):
    costs, runs = calibrating
    costs.update({"linear": 2.0, "three GEMMs": 2.0, fastest: 1.0})
    model = _perturbed_model().train()
    gradients = _gradient_function(model)
    with cpu_fastpath.disabled():
        plain = gradients()
    calibrated = gradients()  # calibration runs on detached copies: the model's gradients are one step's
    assert runs and {line.rsplit("-> ", 1)[1] for line in cpu_fastpath.calibration_report()} == {fastest}
    for a, b in zip(calibrated, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mode_names_and_cpu_description():
    with pytest.raises(ValueError, match="'fast'"):
        cpu_fastpath.set_mode("fast")
    description = cpu_fastpath.cpu_description()
    assert "ATen kernels" in description and torch.backends.cpu.get_cpu_capability() in description


def test_auto_mode_calibrates_inside_activation_checkpointing(monkeypatch):
    cpu_fastpath.set_mode("auto")
    monkeypatch.setattr(cpu_fastpath, "_decisions", {})
    monkeypatch.setattr(cpu_fastpath, "_timings", {})
    model = _perturbed_model(grad_checkpointing=True).train()
    x = torch.randn(1, 3, 32, 48)
    torch.manual_seed(1)  # same drop-path draws
    model(x).sum().backward()  # calibrates under the checkpoint's saved-tensor hooks, then recomputes
    assert any(line.startswith("projection") for line in cpu_fastpath.calibration_report())
    checkpointed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    torch.manual_seed(1)
    with cpu_fastpath.disabled():
        model(x).sum().backward()
    for a, b in zip(checkpointed, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

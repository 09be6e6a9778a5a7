"""Backbone: variants, parameter counts, dense mode, and numerical parity with timm and HF layouts."""
import re

import pytest
import timm
import torch
from timm.models.focalnet import checkpoint_filter_fn

from focalnet_pl import count_parameters, create_focalnet, list_variants, variant_config
from focalnet_pl.weights import CheckpointError, read_state_dict, save_safetensors

# Paper, Table 1-2 (ImageNet-1K models, 1000 classes)
PAPER_PARAMS_M = {
    "focalnet_tiny_srf": 28.4, "focalnet_tiny_lrf": 28.6, "focalnet_small_srf": 49.9,
    "focalnet_small_lrf": 50.3, "focalnet_base_srf": 88.1, "focalnet_base_lrf": 88.7,
}
SMALL = dict(embed_dim=16, depths=(1, 1, 2, 1))


def test_all_twelve_variants_exist():
    names = set(list_variants())
    expected = {f"focalnet_{s}_{r}" for s in ("tiny", "small", "base") for r in ("srf", "lrf")}
    expected |= {f"focalnet_{s}_{f}" for s in ("large", "xlarge", "huge") for f in ("fl3", "fl4")}
    assert names == expected


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_parameter_counts_match_paper(name):
    with torch.device("meta"):
        model = create_focalnet(name)
    assert abs(count_parameters(model) / 1e6 - PAPER_PARAMS_M[name]) < 0.05


@pytest.mark.parametrize("name", sorted(set(list_variants()) - set(PAPER_PARAMS_M)))
def test_large_variants_match_timm_parameter_count(name):
    with torch.device("meta"):
        ours = create_focalnet(name)
        ref = timm.create_model(name, num_classes=1000)
    assert count_parameters(ours) == count_parameters(ref)


def test_unknown_variant_lists_valid_names():
    with pytest.raises(ValueError, match="focalnet_tiny_srf"):
        create_focalnet("focalnet_tiny")
    with pytest.raises(ValueError, match="embed_dimm"):
        create_focalnet("focalnet_tiny_srf", embed_dimm=3)


def test_bad_input_shape_and_dtype():
    model = create_focalnet("focalnet_tiny_srf", num_classes=3, **SMALL)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_dense_mode_any_size_strides_and_frozen_stages():
    model = create_focalnet("focalnet_tiny_lrf", features_only=True, out_indices=(1, 2, 3), frozen_stages=1, **SMALL)
    feats = model(torch.randn(2, 3, 97, 70))
    assert [f.shape[1] for f in feats] == model.out_channels == [32, 64, 128]
    assert model.out_strides == [8, 16, 32]
    assert [tuple(f.shape[-2:]) for f in feats] == [(13, 9), (7, 5), (4, 3)]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("patch_embed.", "layers.0.")) for n in frozen)
    model.train()
    assert not model.layers[0].training and model.layers[1].training
    feats[-1].sum().backward()
    assert model.layers[0].blocks[0].mlp.fc1.weight.grad is None


def test_activation_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = create_focalnet("focalnet_tiny_srf", features_only=True, drop_path_rate=0.0, **SMALL)
    b = create_focalnet("focalnet_tiny_srf", features_only=True, drop_path_rate=0.0, grad_checkpointing=True, **SMALL)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 3, 64, 64)
    sum(f.sum() for f in a(x)).backward()
    sum(f.sum() for f in b(x)).backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n, rtol=1e-5, atol=1e-6)


def _randomize(model: torch.nn.Module) -> None:
    """Non-trivial random weights at init-like scale (large scales make deep random nets chaotic)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and ("gamma" in name or name.endswith("weight")):  # layerscale, norm scales
                p.copy_(0.5 + 0.1 * noise if "gamma" in name else 1.0 + 0.1 * noise)
            elif p.ndim == 1:  # biases
                p.copy_(0.02 * noise)
            else:
                p.copy_(noise * min(0.05, 1.0 / p[0].numel() ** 0.5))


def _timm_to_official(sd: dict) -> dict:
    """Independent inverse of timm's own official->timm conversion (checked against it below)."""
    out = {}
    for k, v in sd.items():
        k = re.sub(r"^stem\.", "patch_embed.", k)
        k = re.sub(r"^layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        k = re.sub(r"ls([12])\.gamma", r"gamma_\1", k)
        k = re.sub(r"norm([12])_post", r"norm\1", k)
        k = k.replace("modulation.norm.", "modulation.ln.")
        k = k.replace("head.fc.", "head.")
        if v.ndim == 4 and v.shape[-2:] == (1, 1) and not k.startswith("patch_embed") and "downsample" not in k:
            # official: f, proj, fc1, fc2 are Linear; h stays a 1x1 conv
            v = v.flatten(1) if ".modulation.h." not in k else v
        out[k] = v
    return out


def _timm_model(name: str, num_classes: int, **overrides) -> torch.nn.Module:
    """timm's FocalNet by name, or (with size overrides, which timm's registry rejects) its class
    built with the variant's flags; full-size flags are cross-checked by the parameter-count tests."""
    if not overrides:
        return timm.create_model(name, num_classes=num_classes)
    from timm.models.focalnet import FocalNet as TimmFocalNet

    cfg = variant_config(name, **overrides)
    return TimmFocalNet(
        num_classes=num_classes, embed_dim=cfg.embed_dim, depths=cfg.depths, focal_levels=cfg.focal_levels,
        focal_windows=cfg.focal_windows, use_overlap_down=cfg.use_conv_embed, use_post_norm=cfg.use_postln,
        use_post_norm_in_modulation=cfg.use_postln_in_modulation, normalize_modulator=cfg.normalize_modulator,
        layerscale_value=cfg.layerscale_value if cfg.use_layerscale else None, drop_path_rate=0.0,
    )


PARITY = [
    ("focalnet_tiny_srf", {}),
    ("focalnet_tiny_lrf", {}),
    ("focalnet_base_lrf", dict(embed_dim=24, depths=(1, 1, 2, 1))),
    ("focalnet_large_fl3", dict(embed_dim=24, depths=(1, 1, 2, 1))),  # conv embed, post-LN, layerscale
    ("focalnet_large_fl4", dict(embed_dim=24, depths=(1, 1, 2, 1))),  # normalize_modulator (official YAML)
    ("focalnet_huge_fl4", dict(embed_dim=24, depths=(1, 1, 2, 1))),  # + post-LN inside modulation
]


@pytest.mark.parametrize("name,overrides", PARITY, ids=[p[0] for p in PARITY])
def test_logits_match_timm_in_timm_and_official_layouts(name, overrides, tmp_path):
    ref = _timm_model(name, num_classes=7, **overrides).eval()
    _randomize(ref)
    timm_sd = ref.state_dict()
    official_sd = _timm_to_official(timm_sd)
    # our official layout really is what timm's own converter expects
    back = checkpoint_filter_fn({"model": official_sd}, ref)
    assert set(back) == set(timm_sd)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(x)
    for layout, sd in (("timm", timm_sd), ("official", {"model": official_sd})):
        path = tmp_path / f"{layout}.pth"
        torch.save(sd, path)
        ours = create_focalnet(name, num_classes=7, weights=str(path), **overrides).eval()
        with torch.no_grad():
            got = ours(x)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=f"{layout} layout")


def test_logits_match_huggingface_layout(tmp_path):
    from transformers import FocalNetConfig, FocalNetForImageClassification

    cfg = FocalNetConfig(embed_dim=24, depths=[1, 1, 2, 1], focal_levels=[3] * 4, focal_windows=[3] * 4,
                         use_conv_embed=True, use_post_layernorm=True, use_layerscale=True, num_labels=5,
                         use_post_layernorm_in_modulation=True, drop_path_rate=0.0)
    ref = FocalNetForImageClassification(cfg).eval()
    _randomize(ref)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = ref(pixel_values=x).logits
    path = tmp_path / "hf.safetensors"
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = create_focalnet("focalnet_huge_fl3", num_classes=5, weights=str(path), embed_dim=24, depths=(1, 1, 2, 1),
                           focal_windows=(3,) * 4).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-5)


def test_classification_checkpoint_into_dense_backbone_and_new_head(tmp_path, caplog):
    cls = create_focalnet("focalnet_tiny_srf", num_classes=10, **SMALL)
    path = tmp_path / "cls.pth"
    torch.save({"model": cls.state_dict()}, path)
    dense = create_focalnet("focalnet_tiny_srf", features_only=True, weights=str(path), **SMALL)
    torch.testing.assert_close(dense.layers[2].blocks[1].modulation.f.weight, cls.layers[2].blocks[1].modulation.f.weight)
    with caplog.at_level("INFO"):
        other = create_focalnet("focalnet_tiny_srf", num_classes=3, weights=str(path), **SMALL)
    assert other.head.weight.shape == (3, 128)
    assert "head.weight" in caplog.text


def test_more_focal_levels_and_larger_kernels_load_with_zero_padding(tmp_path):
    small = create_focalnet("focalnet_tiny_srf", num_classes=4, **SMALL)  # 2 levels, window 3
    path = tmp_path / "srf.pth"
    torch.save(small.state_dict(), path)
    big = create_focalnet("focalnet_tiny_lrf", num_classes=4, weights=str(path), focal_windows=(5,) * 4, **SMALL)
    mod_s, mod_b = small.layers[0].blocks[0].modulation, big.layers[0].blocks[0].modulation
    assert mod_b.focal_layers[0][0].weight.shape[-1] == 5
    torch.testing.assert_close(mod_b.focal_layers[0][0].weight[..., 1:4, 1:4], mod_s.focal_layers[0][0].weight)
    assert mod_b.focal_layers[0][0].weight[..., 0, :].abs().sum() == 0
    dim = 16
    f_b, f_s = mod_b.f.weight, mod_s.f.weight
    torch.testing.assert_close(f_b[: 2 * dim + 2], f_s[: 2 * dim + 2])
    assert f_b[2 * dim + 2].abs().sum() == 0  # new level gate
    torch.testing.assert_close(f_b[-1], f_s[-1])  # global gate


def test_mismatched_checkpoint_lists_keys(tmp_path):
    a = create_focalnet("focalnet_tiny_srf", num_classes=4, **SMALL)
    sd = a.state_dict()
    sd.pop("layers.1.blocks.0.mlp.fc1.weight")
    sd["layers.0.blocks.0.norm1.weight"] = torch.ones(5)
    sd["extra.thing"] = torch.ones(1)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        create_focalnet("focalnet_tiny_srf", num_classes=4, weights=str(path), **SMALL)
    msg = str(err.value)
    assert "missing (1): layers.1.blocks.0.mlp.fc1.weight" in msg
    assert "unexpected (1): extra.thing" in msg
    assert "layers.0.blocks.0.norm1.weight (checkpoint (5,) vs model (16,))" in msg


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError, match="Refused to load"):
        read_state_dict(path)


def test_missing_file_and_plain_http_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="only https"):
        read_state_dict("http://example.com/w.pth")


def test_safetensors_roundtrip(tmp_path):
    a = create_focalnet("focalnet_tiny_srf", num_classes=4, **SMALL).eval()
    path = save_safetensors(a, tmp_path / "a.safetensors")
    b = create_focalnet("focalnet_tiny_srf", num_classes=4, weights=str(path), **SMALL).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x))

"""FocalNet as a detectron2 backbone, and the detectron2 config helpers."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from detectron2.structures import ImageList

from focalnet_pl import create_focalnet
from focalnet_pl.d2 import CONFIG_EXTENSIONS, FocalNetBackbone, build_detectron2_cfg

TINY = {"EMBED_DIM": 16, "DEPTHS": [1, 1, 2, 1], "DROP_PATH_RATE": 0.0}


def tiny_cfg(**focalnet) -> CfgNode:
    return build_detectron2_cfg({"MODEL": {"FOCALNET": {**TINY, **focalnet}}})


@pytest.mark.parametrize(("height", "width"), [(67, 93), (64, 64), (33, 129)])
def test_output_shapes_and_strides_for_odd_input_sizes(height, width):
    backbone = BACKBONE_REGISTRY.get("build_focalnet_backbone")(tiny_cfg(), ShapeSpec(channels=3))
    assert isinstance(backbone, FocalNetBackbone) and backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {k: (v.channels, v.stride) for k, v in shapes.items()} == {
        "res2": (16, 4), "res3": (32, 8), "res4": (64, 16), "res5": (128, 32),
    }
    features = backbone(torch.randn(2, 3, height, width))
    for name, feature in features.items():
        stride = shapes[name].stride
        assert feature.shape == (2, shapes[name].channels, math.ceil(height / stride), math.ceil(width / stride))


def test_out_features_subset_and_invalid_names():
    backbone = FocalNetBackbone("focalnet_tiny_lrf", out_features=["res3", "res5"], embed_dim=16, depths=(1, 1, 1, 1))
    assert list(backbone(torch.randn(1, 3, 64, 64))) == ["res3", "res5"]
    assert backbone.body.cfg.focal_levels == (3, 3, 3, 3)
    with pytest.raises(ValueError, match="res6"):
        FocalNetBackbone("focalnet_tiny_srf", out_features=["res6"], embed_dim=16, depths=(1, 1, 1, 1))


def test_fpn_backbone_pads_to_size_divisibility_and_adds_p6():
    cfg = build_detectron2_cfg({"MODEL": {
        "BACKBONE": {"NAME": "build_focalnet_fpn_backbone"}, "FOCALNET": TINY,
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "OUT_CHANNELS": 32},
    }})
    fpn = build_backbone(cfg)
    assert fpn.size_divisibility == 32
    assert {k: v.stride for k, v in fpn.output_shape().items()} == {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}
    images = ImageList.from_tensors([torch.randn(3, 70, 90), torch.randn(3, 50, 100)], fpn.size_divisibility)
    assert images.tensor.shape[-2:] == (96, 128)
    outputs = fpn(images.tensor)
    assert outputs["p2"].shape == (2, 32, 24, 32) and outputs["p6"].shape == (2, 32, 2, 2)
    bad = build_detectron2_cfg({"MODEL": {"FOCALNET": {**TINY, "OUT_FEATURES": ["res4", "res5"]},
                                          "FPN": {"IN_FEATURES": ["res3", "res4", "res5"]}}})
    with pytest.raises(ValueError, match="res3"):
        BACKBONE_REGISTRY.get("build_focalnet_fpn_backbone")(bad, ShapeSpec(channels=3))


def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode():
    backbone = BACKBONE_REGISTRY.get("build_focalnet_backbone")(
        tiny_cfg(FROZEN_STAGES=1, DROP_PATH_RATE=0.1), ShapeSpec(channels=3)
    )
    backbone.train()
    features = backbone(torch.randn(1, 3, 64, 64))
    sum(f.sum() for f in features.values()).backward()
    body = backbone.body
    frozen = list(body.patch_embed.parameters()) + list(body.layers[0].parameters())
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert not body.layers[0].training and body.layers[1].training
    trainable = list(body.layers[1].parameters())
    assert all(p.requires_grad and p.grad is not None for p in trainable)


def test_gradient_checkpointing_gives_the_same_features_and_gradients():
    torch.manual_seed(0)
    plain = FocalNetBackbone("focalnet_tiny_srf", embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.0)
    checkpointed = FocalNetBackbone("focalnet_tiny_srf", embed_dim=16, depths=(1, 1, 2, 1), drop_path_rate=0.0,
                                    grad_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert all(stage.grad_checkpointing for stage in checkpointed.body.layers)
    x = torch.randn(1, 3, 64, 64)
    outputs = [sum(f.square().sum() for f in m(x).values()) for m in (plain, checkpointed)]
    for out in outputs:
        out.backward()
    assert torch.allclose(outputs[0], outputs[1])
    weight = "body.layers.2.blocks.0.modulation.f.weight"
    grads = [dict(m.named_parameters())[weight].grad for m in (plain, checkpointed)]
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_classification_weights_load_into_the_backbone(tmp_path):
    classifier = create_focalnet("focalnet_tiny_srf", num_classes=7, embed_dim=16, depths=(1, 1, 2, 1))
    path = tmp_path / "classifier.pth"
    torch.save({"model": classifier.state_dict()}, path)
    backbone = BACKBONE_REGISTRY.get("build_focalnet_backbone")(tiny_cfg(WEIGHTS=str(path)), ShapeSpec(channels=3))
    loaded = backbone.body.state_dict()
    for name, value in classifier.state_dict().items():
        if name in loaded:
            assert torch.equal(loaded[name], value), name
    assert torch.equal(loaded["layers.2.blocks.1.modulation.f.weight"], classifier.state_dict()["layers.2.blocks.1.modulation.f.weight"])


def test_config_merge_names_the_full_key_of_errors():
    cfg = build_detectron2_cfg({"MODEL": {"FOCALNET": {"VARIANT": "focalnet_small_lrf", "DEPTHS": [1, 1, 1, 1]},
                                          "ROI_HEADS": {"NUM_CLASSES": 5, "SCORE_THRESH_TEST": 1}}})
    assert cfg.MODEL.FOCALNET.VARIANT == "focalnet_small_lrf" and cfg.MODEL.FOCALNET.DEPTHS == [1, 1, 1, 1]
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 1.0 and isinstance(cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST, float)
    assert cfg.is_frozen()
    with pytest.raises(KeyError, match="MODEL.FOCALNET.EMBEDDIM"):
        build_detectron2_cfg({"MODEL": {"FOCALNET": {"EMBEDDIM": 3}}})
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES.*int.*str"):
        build_detectron2_cfg({"MODEL": {"ROI_HEADS": {"NUM_CLASSES": "five"}}})
    with pytest.raises(ValueError, match="MODEL.FPN' is a section"):
        build_detectron2_cfg({"MODEL": {"FPN": 3}})


def test_config_extensions_are_applied():
    def add_extra(cfg: CfgNode) -> None:
        cfg.MODEL.EXTRA_TEST_NODE = CfgNode({"WIDTH": 4})

    CONFIG_EXTENSIONS.append(add_extra)
    try:
        assert build_detectron2_cfg({"MODEL": {"EXTRA_TEST_NODE": {"WIDTH": 8}}}).MODEL.EXTRA_TEST_NODE.WIDTH == 8
    finally:
        CONFIG_EXTENSIONS.remove(add_extra)
    assert "EXTRA_TEST_NODE" not in build_detectron2_cfg().MODEL


def test_meta_architecture_module_is_imported_for_its_config_keys():
    cfg = build_detectron2_cfg({"MODEL": {"META_ARCHITECTURE": "DINO", "DINO": {"NUM_QUERIES": 10}}})
    assert cfg.MODEL.DINO.NUM_QUERIES == 10

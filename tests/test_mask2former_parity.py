"""Mask2Former against the official code: an official-layout checkpoint loads into our model, which then
gives the official outputs (pixel-decoder features, class and mask logits of every layer, semantic /
panoptic / instance inference); the official inference rules on model-like logits; the official
optimizer grouping. Golden values: ``scripts/make_mask2former_fixtures.py`` (tests/fixtures)."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model

from focalnet_pl import load_detector_weights
from focalnet_pl.d2.config import build_detectron2_cfg
from focalnet_pl.mask2former import instance_inference, panoptic_inference
from focalnet_pl.mask2former.weights import Mask2FormerLayout
from focalnet_pl.weights import CheckpointError

FIXTURE = Path(__file__).parent / "fixtures" / "mask2former_official.pt"
ATOL = 1e-5


@pytest.fixture(scope="module")
def official() -> dict:
    return torch.load(FIXTURE, weights_only=True)


def _model(config: dict, **mask_former):
    config = copy.deepcopy(config)
    config["MODEL"]["MASK_FORMER"].update(mask_former)
    config["MODEL"]["MASK_PADDING"] = False  # the official Mask2Former computes on the padding
    torch.manual_seed(1)
    return build_model(build_detectron2_cfg(config)).eval()


@pytest.fixture(scope="module")
def loaded(official):
    model = _model(official["config"])
    report = load_detector_weights(model, official["checkpoint"])
    return model, report


def test_official_checkpoint_fills_every_tensor(official, loaded) -> None:
    model, report = loaded
    assert report.layout == "mask2former"
    assert not report.problems() and not report.reinitialised
    assert report.skipped == ["criterion.empty_weight: loss constant, set by MODEL.MASK_FORMER.NO_OBJECT_WEIGHT"]
    assert sorted(report.loaded + report.converted) == sorted(model.state_dict())
    # spot checks of the renaming: the FPN convs (finest level last in ours), the MLP layers, the decoder layers
    source = official["checkpoint"]["model"]
    pairs = {
        "pixel_decoder.lateral_convs.0.1.weight": "sem_seg_head.pixel_decoder.adapter_1.norm.weight",
        "pixel_decoder.encoder_layers.1.ffn.3.weight": "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.linear2.weight",
        "transformer_decoder.mask_embed.layers.2.bias": "sem_seg_head.predictor.mask_embed.layers.2.bias",
        "transformer_decoder.cross_attention.2.attention.in_proj_weight":
            "sem_seg_head.predictor.transformer_cross_attention_layers.2.multihead_attn.in_proj_weight",
        "backbone.body.layers.3.blocks.0.modulation.f.weight": "backbone.body.layers.3.blocks.0.modulation.f.weight",
    }
    state = model.state_dict()
    for ours, theirs in pairs.items():
        assert torch.equal(state[ours], source[theirs].float()), ours


def _run(model, inputs: list[dict]) -> tuple[dict, list[dict]]:
    captured: dict = {}
    hooks = [
        model.pixel_decoder.register_forward_hook(lambda _m, _i, out: captured.update(pixel=out)),
        model.transformer_decoder.register_forward_hook(lambda _m, _i, out: captured.update(head=out)),
    ]
    try:
        with torch.no_grad():
            results = model(copy.deepcopy(inputs))
    finally:
        for hook in hooks:
            hook.remove()
    return captured, results


def _close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> float:
    assert ours.shape == theirs.shape, what
    difference = float((ours.float() - theirs.float()).abs().max()) if ours.numel() else 0.0
    assert difference <= ATOL * max(1.0, float(theirs.abs().max())), f"{what}: max |diff| {difference}"
    return difference


def _sorted_instances(masks: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor):
    order = scores.argsort(descending=True)
    return masks[order], scores[order], classes[order]


@pytest.mark.parametrize("case", range(3))
def test_outputs_equal_the_official_model(official, loaded, case: int) -> None:
    """Every intermediate and result, three batches (odd sizes, padding, outputs resized)."""
    model, _ = loaded
    expected = official["cases"][case]["outputs"]
    inputs = official["cases"][case]["inputs"]
    captured, results = _run(model, inputs)
    mask_features, multi_scale = captured["pixel"]
    _close(mask_features, expected["mask_features"], "mask features")
    for level, (ours, theirs) in enumerate(zip(multi_scale, expected["multi_scale_features"], strict=True)):
        _close(ours, theirs, f"multi-scale level {level}")
    head = captured["head"]
    layers = [*head["aux_outputs"], {"pred_logits": head["pred_logits"], "pred_masks": head["pred_masks"]}]
    assert len(layers) == len(expected["pred_logits"])
    for index, layer in enumerate(layers):
        _close(layer["pred_logits"], expected["pred_logits"][index], f"class logits of layer {index}")
        _close(layer["pred_masks"], expected["pred_masks"][index], f"mask logits of layer {index}")

    for ours, theirs in zip(results, expected["results"], strict=True):
        _close(ours["sem_seg"], theirs["sem_seg"], "semantic scores (masks resized first)")
        segment_map, segments = ours["panoptic_seg"]
        assert segments == theirs["segments_info"]
        assert torch.equal(segment_map, theirs["panoptic_seg"])
        instances = ours["instances"]
        ours_sorted = _sorted_instances(instances.pred_masks, instances.scores, instances.pred_classes)
        theirs_sorted = _sorted_instances(theirs["instance_masks"], theirs["instance_scores"], theirs["instance_classes"])
        assert torch.equal(ours_sorted[0], theirs_sorted[0]) and torch.equal(ours_sorted[2], theirs_sorted[2])
        _close(ours_sorted[1], theirs_sorted[1], "instance scores")

    # semantic segmentation alone: class and mask scores combined at the input size, then resized
    model.panoptic_on = model.instance_on = model.resize_before_inference = False
    try:
        _, semantic_only = _run(model, inputs)
    finally:
        model.panoptic_on = model.instance_on = model.resize_before_inference = True
    for ours, theirs in zip(semantic_only, expected["results"], strict=True):
        _close(ours["sem_seg"], theirs["sem_seg_combine_first"], "semantic scores (combined first)")


def test_inference_rules_equal_the_official_ones(official) -> None:
    """Panoptic merging and instance selection of model-like logits at several thresholds."""
    thing_ids = set(official["config"]["MODEL"]["MASK_FORMER"]["THING_CLASS_IDS"])
    top_k = official["config"]["MODEL"]["MASK_FORMER"]["TEST"]["DETECTIONS_PER_IMAGE"]
    for index, case in enumerate(official["inference_cases"]):
        class_logits, mask_logits = case["class_logits"].float(), case["mask_logits"].float()
        segment_map, segments = panoptic_inference(
            class_logits, mask_logits, thing_ids, case["object_mask_threshold"], case["overlap_threshold"]
        )
        assert segments == case["segments_info"], index
        assert torch.equal(segment_map, case["panoptic_seg"].int()), index
        instances = instance_inference(class_logits, mask_logits, top_k, thing_ids)
        ours = _sorted_instances(instances.pred_masks, instances.scores, instances.pred_classes)
        theirs = _sorted_instances(case["instance_masks"], case["instance_scores"], case["instance_classes"])
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[2], theirs[2]), index
        _close(ours[1], theirs[1], f"instance scores of case {index}")


def test_optimizer_groups_follow_the_official_rule(official) -> None:
    """The lr and weight decay of each of our parameters are those the official ``build_optimizer``
    gives the same parameter (biases decay; norms, query and level embeddings do not)."""
    from focalnet_pl.tasks.segmentation import SegmentationTask

    task = SegmentationTask(detectron2=official["config"], lr=1e-4, backbone_lr=1e-5, weight_decay=0.05)
    ours = {
        name: (group["lr"], group["weight_decay"])
        for group in task.configure_optimizers()["optimizer"].param_groups
        for name in group["param_names"]
    }
    # our name of each official parameter, through the checkpoint conversion
    model = task.model
    numbered = {name: torch.tensor([float(index)]) for index, name in enumerate(official["parameter_groups"])}
    converted = Mask2FormerLayout().convert({"model": numbered}, model).tensors
    names = list(numbered)
    theirs = {ours_name: official["parameter_groups"][names[int(tensor)]] for ours_name, tensor in converted.items()}
    assert set(theirs) == set(ours)
    for name, (lr, decay) in ours.items():
        assert (lr, decay) == pytest.approx((theirs[name]["lr"], theirs[name]["weight_decay"])), name
    decays = {name: decay for name, (_, decay) in ours.items()}
    assert decays["transformer_decoder.class_embed.bias"] == 0.05  # biases decay
    assert decays["pixel_decoder.level_embed"] == 0.05  # a plain Parameter in the official pixel decoder
    assert decays["transformer_decoder.query_features.weight"] == 0.0  # nn.Embedding
    assert decays["pixel_decoder.input_projections.0.1.weight"] == 0.0  # GroupNorm


# ---- checkpoints of other forms and other architectures --------------------------------------------------
def test_detectron2_pickle_of_numpy_arrays_loads(official, loaded, tmp_path) -> None:
    path = tmp_path / "model_final.pkl"
    arrays = {k: v.float().numpy() for k, v in official["checkpoint"]["model"].items()}
    path.write_bytes(pickle.dumps({"model": arrays, "__author__": "test"}))
    model = _model(official["config"])
    report = load_detector_weights(model, str(path))
    assert not report.problems()
    reference = loaded[0].state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in model.state_dict().items())

    class Payload:
        def __reduce__(self):
            return (print, ("ran code",))

    path.write_bytes(pickle.dumps({"model": arrays, "extra": Payload()}))
    with pytest.raises(CheckpointError, match="Refused to load .*builtins.print"):
        load_detector_weights(model, str(path))


def test_swin_backbone_is_skipped_or_refused_by_name(official) -> None:
    head = {k: v for k, v in official["checkpoint"]["model"].items() if not k.startswith("backbone.")}
    swin = {
        "backbone.patch_embed.proj.weight": torch.zeros(96, 3, 4, 4),
        "backbone.layers.0.blocks.0.attn.relative_position_bias_table": torch.zeros(169, 3),
    }
    checkpoint = {"model": {**head, **swin}}
    model = _model(official["config"])
    backbone_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): backbone\.body.*unexpected \(2\): backbone\.patch_embed"):
        load_detector_weights(model, checkpoint)
    report = load_detector_weights(model, checkpoint, checkpoint_filter=lambda key: not key.startswith("backbone."))
    assert not report.problems()
    assert sorted(entry.split(":")[0] for entry in report.skipped) == sorted([*swin, "criterion.empty_weight"])
    assert all(torch.equal(v, backbone_before[k]) for k, v in model.backbone.state_dict().items())


def test_other_depths_and_class_counts(official) -> None:
    with pytest.raises(CheckpointError, match="3 masked-attention decoder layers .* the model 2"):
        load_detector_weights(_model(official["config"], DEC_LAYERS=2), official["checkpoint"])
    fewer = copy.deepcopy(official["config"])
    fewer["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] = 4
    fewer["MODEL"]["MASK_FORMER"]["THING_CLASS_IDS"] = [0, 2, 3]
    model = _model(fewer)
    report = load_detector_weights(model, official["checkpoint"])
    assert not report.problems()
    assert sorted(entry.split(":")[0] for entry in report.reinitialised) == [
        "transformer_decoder.class_embed.bias", "transformer_decoder.class_embed.weight"]
    assert all("checkpoint has 5 classes, model 4" in entry for entry in report.reinitialised)


def test_pixel_decoder_runs_in_float32_under_autocast(loaded) -> None:
    """As the official code: mixed precision leaves the pixel decoder (deformable attention) in float32."""
    model, _ = loaded
    generator = torch.Generator().manual_seed(0)
    features = {name: torch.randn(1, shape.channels, 64 // shape.stride, 96 // shape.stride, generator=generator)
                for name, shape in model.backbone.output_shape().items()}
    rounded = {name: value.bfloat16() for name, value in features.items()}  # what a bf16 backbone gives
    with torch.no_grad():
        reference = model.pixel_decoder({name: value.float() for name, value in rounded.items()})
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model.pixel_decoder(rounded)
    for ours, theirs in zip([mixed[0], *mixed[1]], [reference[0], *reference[1]], strict=True):
        assert ours.dtype == torch.float32 and torch.equal(ours, theirs)


def test_model_weights_of_the_segmentation_task(official, loaded, tmp_path) -> None:
    """``MODEL.WEIGHTS``: the whole official checkpoint; with ``MODEL.FOCALNET.WEIGHTS`` the backbone comes
    from that file and the checkpoint's backbone tensors are reported as skipped."""
    from focalnet_pl.tasks.segmentation import SegmentationTask

    checkpoint = tmp_path / "model_final.pth"
    torch.save(official["checkpoint"], checkpoint)
    config = copy.deepcopy(official["config"])
    config["MODEL"]["WEIGHTS"] = str(checkpoint)
    task = SegmentationTask(detectron2=config)
    task.setup("fit")
    assert task.weights_report.layout == "mask2former" and not task.weights_report.problems()
    reference = loaded[0].state_dict()
    assert all(torch.equal(value, reference[key]) for key, value in task.model.state_dict().items())

    backbone = {k.removeprefix("backbone.body."): v.float() + 1 for k, v in official["checkpoint"]["model"].items()
                if k.startswith("backbone.body.")}
    torch.save(backbone, tmp_path / "focalnet.pth")
    config["MODEL"]["FOCALNET"]["WEIGHTS"] = str(tmp_path / "focalnet.pth")
    task = SegmentationTask(detectron2=config)
    task.setup("fit")
    report = task.weights_report
    assert not report.problems()
    assert sum(entry.startswith("backbone.body.") for entry in report.skipped) == len(backbone)
    state = task.model.state_dict()
    assert all(torch.equal(state[f"backbone.body.{k}"], v) for k, v in backbone.items())
    assert torch.equal(state["transformer_decoder.class_embed.weight"], reference["transformer_decoder.class_embed.weight"])

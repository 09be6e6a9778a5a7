"""``load_detector_weights``: our own files round-trip, class tensors re-initialised when the class set
differs, and a checkpoint of another architecture refused naming what differs."""

from __future__ import annotations

import pytest
import torch
from detectron2.modeling import build_model

from focalnet_pl import load_detector_weights
from focalnet_pl.d2 import build_detectron2_cfg
from focalnet_pl.detector_weights import ClassRows, ConvertedState, DetectorLoadReport, FocalNetPLLayout
from focalnet_pl.weights import CheckpointError


def tiny_dino(num_classes: int = 3, levels: int = 3):
    torch.manual_seed(num_classes * 10 + levels)
    features = ["res3", "res4", "res5"]
    return build_model(build_detectron2_cfg({"MODEL": {
        "META_ARCHITECTURE": "DINO", "DEVICE": "cpu", "BACKBONE": {"NAME": "build_focalnet_backbone"},
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
        "DINO": {"NUM_CLASSES": num_classes, "HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2,
                 "DIM_FEEDFORWARD": 64, "NUM_QUERIES": 20, "NUM_FEATURE_LEVELS": levels, "IN_FEATURES": features},
    }}))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple[str, ...] = ()) -> None:
    theirs = b.state_dict()
    for key, value in a.state_dict().items():
        if not any(part in key for part in skip):
            assert torch.equal(value, theirs[key]), key


def test_lightning_checkpoint_and_plain_state_dict_round_trip(tmp_path):
    source, target = tiny_dino(), tiny_dino()
    target.load_state_dict({k: v + 1 for k, v in target.state_dict().items()})
    path = tmp_path / "task.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    report = load_detector_weights(target, str(path))
    assert isinstance(report, DetectorLoadReport) and report.layout == "focalnet-pl"
    assert not report.problems() and not report.reinitialised
    assert len(report.loaded) == len(target.state_dict())
    assert_same_weights(source, target)
    # the same weights as a plain state dict in memory
    load_detector_weights(tiny_dino(), {"model": source.state_dict()})


def test_class_tensors_reinitialised_when_the_class_set_differs(tmp_path):
    source, target = tiny_dino(num_classes=3), tiny_dino(num_classes=5)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_detector_weights(target, {"model": source.state_dict()}, strict=False)
    # without class rows declared by a layout, class heads are ordinary tensors of another shape
    assert report.wrong_shape and all("class" in entry or "label" in entry for entry in report.wrong_shape)
    for key in report.wrong_shape:
        name = key.split(" ", 1)[0]
        assert torch.equal(target.state_dict()[name], before[name])


def test_class_rows_selected_by_dataset_id():
    class Rows:
        name = "rows-test"

        def matches(self, checkpoint):
            return "rows" in checkpoint

        def convert(self, checkpoint, model):
            state = dict(checkpoint["rows"])
            return ConvertedState(
                tensors=state,
                class_rows={k: ClassRows(source_ids=tuple(range(5))) for k in state
                            if "class_head" in k or k.startswith("label_embedding")},
            )

    from focalnet_pl.detector_weights import DETECTOR_LAYOUTS, register_detector_layout
    layout = register_detector_layout(Rows())
    try:
        five = tiny_dino(num_classes=5)
        three = tiny_dino(num_classes=3)
        checkpoint = {"rows": {k: v for k, v in five.state_dict().items()}}
        report = load_detector_weights(three, checkpoint, class_ids=[4, 0, 2])
        assert report.layout == "rows-test" and not report.reinitialised
        assert "transformer.class_head.weight" in report.converted
        torch.testing.assert_close(three.transformer.class_head.weight, five.transformer.class_head.weight[[4, 0, 2]])
        torch.testing.assert_close(three.label_embedding.weight, five.label_embedding.weight[[4, 0, 2]])
        # ids the checkpoint does not have: fine-tuning on another class set re-initialises the class tensors
        other = tiny_dino(num_classes=3)
        head = other.transformer.class_head.weight.clone()
        report = load_detector_weights(other, checkpoint, class_ids=[7, 8, 9])
        assert any(entry.startswith("transformer.class_head.weight: class set differs") for entry in report.reinitialised)
        assert torch.equal(other.transformer.class_head.weight, head)
        assert torch.equal(other.transformer.encoder_layers[0].norm1.weight, five.transformer.encoder_layers[0].norm1.weight)
    finally:
        DETECTOR_LAYOUTS.remove(layout)


def test_another_architecture_is_refused_naming_the_differences():
    four_levels = tiny_dino(levels=4)
    with pytest.raises(CheckpointError, match=r"level_embed.*\(4, 32\) vs model \(3, 32\)"):
        load_detector_weights(tiny_dino(levels=3), {"model": four_levels.state_dict()})
    partial = {k: v for k, v in tiny_dino().state_dict().items() if "decoder_layers.1." not in k}
    with pytest.raises(CheckpointError, match=r"missing \(\d+\): transformer.decoder_layers.1"):
        load_detector_weights(tiny_dino(), {"model": partial})
    extra = dict(tiny_dino().state_dict(), **{"head.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unexpected \(1\): head.extra.weight"):
        load_detector_weights(tiny_dino(), {"model": extra})
    report = load_detector_weights(tiny_dino(), {"model": extra}, strict=False)
    assert report.unexpected == ["head.extra.weight"]


def test_code_running_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": tiny_dino().state_dict(), "args": FocalNetPLLayout()}, path)
    with pytest.raises(CheckpointError, match="Refused to load"):
        load_detector_weights(tiny_dino(), str(path))

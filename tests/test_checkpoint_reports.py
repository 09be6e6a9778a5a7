"""Nothing dropped silently: detector keys given as backbone weights are reported, a checkpoint of another
architecture fails naming what differs, checkpoints carry their architecture, ImageNet-22K heads are named
and mapped to 1K, and ``focalnet-pl inspect`` tells what a file is."""

from __future__ import annotations

import logging

import pytest
import torch

from focalnet_pl import create_focalnet
from focalnet_pl.architecture import ARCHITECTURE_KEY
from focalnet_pl.cli import main as cli_main
from focalnet_pl.export import export_weights
from focalnet_pl.tasks.classification import ClassificationTask
from focalnet_pl.tasks.detection import DetectionTask
from focalnet_pl.weights import CheckpointError
from helpers import mask_rcnn, mask_rcnn_config, mmdet_checkpoint

TINY = {"embed_dim": 16, "depths": (1, 1, 1, 1)}


def test_full_detector_checkpoint_as_backbone_weights_reports_what_it_did_not_use(tmp_path, caplog):
    path = tmp_path / "mask_rcnn.pth"
    checkpoint = mmdet_checkpoint()
    torch.save(checkpoint, path)
    heads = sorted(k for k in checkpoint["state_dict"] if not k.startswith("backbone."))
    with caplog.at_level(logging.WARNING, logger="focalnet_pl.weights"):
        backbone = create_focalnet("focalnet_tiny_srf", features_only=True, focal_windows=(9,) * 4, weights=str(path), **TINY)
    assert sorted(backbone.weights_report.ignored) == heads and len(heads) == 42
    warning = caplog.records[-1].getMessage()
    assert "neck.* (16), rpn_head.* (6), roi_head.* (20)" in warning and "NOT loaded" in warning
    assert "MODEL.WEIGHTS / focalnet_pl.load_detector_weights" in warning
    # the same file as MODEL.FOCALNET.WEIGHTS of a Mask R-CNN: the backbone says so too
    model = mask_rcnn(FOCALNET={"WEIGHTS": str(path)})
    assert sorted(model.backbone.bottom_up.body.weights_report.ignored) == heads
    # given as the detector's weights, every tensor is used
    task = DetectionTask(detectron2=mask_rcnn_config(), weights=str(path))
    task.setup("test")
    assert task.weights_report.layout == "mmdet-mask-rcnn" and not task.weights_report.problems()
    assert len(task.weights_report.loaded) + len(task.weights_report.converted) == len(checkpoint["state_dict"])


def test_backbone_weights_of_another_architecture_fail_naming_the_differences(tmp_path):
    path = tmp_path / "small.pth"
    torch.save({"model": create_focalnet("focalnet_tiny_lrf", num_classes=5, **TINY).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r"Architecture differs: embed_dim: checkpoint 16, model 24"):
        create_focalnet("focalnet_tiny_lrf", num_classes=5, weights=str(path), embed_dim=24, depths=(1, 1, 1, 1))
    with pytest.raises(CheckpointError, match=r"depths: checkpoint \(1, 1, 1, 1\), model \(1, 1, 2, 1\)"):
        create_focalnet("focalnet_tiny_lrf", num_classes=5, weights=str(path), embed_dim=16, depths=(1, 1, 2, 1))
    with pytest.raises(CheckpointError, match=r"focal_levels: checkpoint \(3, 3, 3, 3\), model \(2, 2, 2, 2\)"):
        create_focalnet("focalnet_tiny_srf", num_classes=5, weights=str(path), **TINY)
    # MODEL.FOCALNET.WEIGHTS goes through the same loader
    detector = tmp_path / "mask_rcnn_width_24.pth"
    torch.save(mmdet_checkpoint(width=24), detector)
    with pytest.raises(CheckpointError, match=r"Architecture differs: embed_dim: checkpoint 24, model 16"):
        mask_rcnn(FOCALNET={"WEIGHTS": str(detector)})


def test_imagenet_22k_head_keeps_the_1k_rows_and_predict_names_its_classes(tmp_path):
    torch.manual_seed(0)
    source = create_focalnet("focalnet_large_fl4", num_classes=21842, **TINY).eval()
    with torch.no_grad():
        source.head.bias.normal_()
    path = tmp_path / "focalnet_large_lrf_384_fl4.pth"
    torch.save({"model": source.state_dict()}, path)
    model = create_focalnet("focalnet_large_fl4", num_classes=1000, weights=str(path), **TINY).eval()
    assert model.weights_report.mapped_head == "21842-class ImageNet head -> rows of the 1000 classes"
    assert not model.weights_report.reinitialised
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), source(images)[:, :1000])  # 1K classes first in the MS 22K order
    ten = create_focalnet("focalnet_large_fl4", num_classes=10, weights=str(path), **TINY)
    assert ten.weights_report.reinitialised == ["head.weight", "head.bias"] and not ten.weights_report.mapped_head

    task = ClassificationTask("focalnet_large_fl4", num_classes=21842, weights=str(path), model_overrides=TINY,
                              predict_draw=False)
    task.eval().on_predict_epoch_start()
    picture = tmp_path / "fish.png"
    results = task.predict_step((images[:1], [str(picture)]), 0)
    top = results[0]["top5"][0]
    assert top["label"] == task.class_name_list()[top["class_id"]] and len(task.class_name_list()) == 21842
    assert task.class_name_list()[0] == "tench, Tinca tinca"
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n\n")
    assert ClassificationTask("focalnet_tiny_srf", num_classes=2, class_names=str(names), model_overrides=TINY
                              ).class_name_list() == ["cat", "dog"]


def test_task_checkpoints_carry_their_architecture_and_refuse_another(tmp_path):
    task = ClassificationTask("focalnet_tiny_srf", num_classes=3, class_names=["a", "b", "c"], model_overrides=TINY)
    checkpoint = {"state_dict": task.state_dict()}
    task.on_save_checkpoint(checkpoint)
    record = checkpoint[ARCHITECTURE_KEY]
    assert record["focalnet"]["embed_dim"] == 16 and record["class_names"] == ["a", "b", "c"]
    other = ClassificationTask("focalnet_tiny_lrf", num_classes=3, model_overrides={"embed_dim": 24, "depths": (1, 1, 1, 1)})
    with pytest.raises(ValueError, match=r"focalnet.embed_dim: checkpoint 16, config 24; focalnet.focal_levels: "
                                         r"checkpoint \[2, 2, 2, 2\], config \[3, 3, 3, 3\]"):
        other.on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"--ckpt_path takes a Lightning checkpoint.*in model.init_args.weights"):
        task.on_load_checkpoint({"model": task.model.state_dict()})  # a released classifier given as --ckpt_path

    def dino(levels: int) -> DetectionTask:
        return DetectionTask(detectron2={"MODEL": {
            "META_ARCHITECTURE": "DINO", "BACKBONE": {"NAME": "build_focalnet_backbone"},
            "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "OUT_FEATURES": ["res2", "res3", "res4", "res5"][4 - levels:]},
            "DINO": {"NUM_CLASSES": 3, "HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 1, "DIM_FEEDFORWARD": 64,
                     "NUM_QUERIES": 10, "NUM_FEATURE_LEVELS": levels, "IN_FEATURES": ["res2", "res3", "res4", "res5"][4 - levels:]},
        }})

    four = dino(4)
    checkpoint = {"state_dict": four.state_dict()}
    four.on_save_checkpoint(checkpoint)
    assert checkpoint[ARCHITECTURE_KEY]["feature_levels"] == {"MODEL.DINO.NUM_FEATURE_LEVELS": 4}
    with pytest.raises(ValueError, match=r"out_features: checkpoint \['res2', 'res3', 'res4', 'res5'\], config "
                                         r"\['res3', 'res4', 'res5'\]; feature_levels.MODEL.DINO.NUM_FEATURE_LEVELS: "
                                         r"checkpoint 4, config 3"):
        dino(3).on_load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=r"top-level keys \['meta', 'model'\]\).*MODEL.WEIGHTS"):
        four.on_load_checkpoint({"meta": {}, "model": four.model.state_dict()})


@pytest.mark.slow
def test_inspect_tells_what_a_file_is(tmp_path, capsys):
    mmdet = tmp_path / "focalnet_tiny_srf_maskrcnn_1x.pth"
    torch.save(mmdet_checkpoint(), mmdet)
    cli_main(["inspect", str(mmdet)])
    out = capsys.readouterr().out
    assert "layout:        mmdet-mask-rcnn" in out and "detector:      Mask R-CNN" in out
    assert "focal_kernels [9, 9, 9, 9]" in out and "classes:       80 (person | bicycle" in out
    assert "parameters:    0.56 M" in out

    official = tmp_path / "focalnet_large_lrf_384_fl4.pth"
    torch.save({"model": create_focalnet("focalnet_large_fl4", num_classes=21842, **TINY).state_dict()}, official)
    cli_main(["inspect", str(official)])
    out = capsys.readouterr().out
    assert "FocalNet classifier/backbone (official names)" in out and "classes:       21842 (tench, Tinca tinca | goldfish" in out

    task = ClassificationTask("focalnet_tiny_srf", num_classes=3, class_names=["a", "b", "c"], model_overrides=TINY)
    lightning = {"state_dict": task.state_dict(), "epoch": 4, "global_step": 40, "pytorch-lightning_version": "2.6.6"}
    task.on_save_checkpoint(lightning)
    torch.save(lightning, tmp_path / "last.ckpt")
    cli_main(["inspect", str(tmp_path / "last.ckpt")])
    out = capsys.readouterr().out
    assert "focalnet-pl Lightning checkpoint" in out and "task:          classification" in out
    assert "variant focalnet_tiny_srf; embed_dim 16" in out and "classes:       3 (a | b | c)" in out
    assert "epoch:         4" in out

    export = export_weights(task, tmp_path / "backbone.safetensors")
    cli_main(["inspect", str(export), "--json"])
    assert '"class_names": [\n   "a",' in capsys.readouterr().out

    (tmp_path / "other.pth").write_bytes(b"")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"not a checkpoint of a recognised layout; first keys: \['weight'\]"):
        cli_main(["inspect", str(tmp_path / "other.pth")])

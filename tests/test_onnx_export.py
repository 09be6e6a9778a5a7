"""ONNX export (``cli.py export --format onnx``), run as a user would, checked with onnxruntime on CPU."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import save_task_checkpoint
from focalnet_pl.export import load_task, onnx_export_spec
from focalnet_pl.tasks import ClassificationTask

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

REPO = Path(__file__).resolve().parents[1]
TINY = {"embed_dim": 8, "depths": [1, 1, 2, 1], "focal_levels": [2, 2, 3, 2]}


@pytest.mark.slow
def test_classifier_exports_to_onnx_for_any_image_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = ClassificationTask(variant="focalnet_tiny_srf", num_classes=4, model_overrides=TINY, class_names=list("abcd"))
    with torch.no_grad():  # trained-like weights: no zero-initialised head or layer hides a wrong graph
        for parameter in task.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "focalnet_pl.tasks.ClassificationTask",
                                                "init_args": {"variant": "focalnet_tiny_srf", "model_overrides": TINY}}}))
    ckpt = save_task_checkpoint(task, tmp_path / "last.ckpt")
    output = tmp_path / "exports" / "classifier.onnx"

    result = subprocess.run(
        [sys.executable, "cli.py", "export", "--format", "onnx", "--config", str(config), "--ckpt_path", str(ckpt),
         "--output", str(output)], cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"wrote {output} (onnxruntime vs PyTorch: max abs difference" in result.stdout

    model = onnx.load(str(output))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in model.graph.input] == ["images"] and dims == ["batch", 3, "height", "width"]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["class_names"]) == list("abcd") and metadata["source_checkpoint"] == str(ckpt)

    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    reference = load_task({"model": {"class_path": "focalnet_pl.tasks.ClassificationTask"}}, ckpt).model
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 64, 64), (2, 3, 45, 77), (3, 3, 100, 33), (1, 3, 7, 5), (1, 3, 224, 161)]:
        images = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = reference(images).numpy()
        (logits,) = session.run(["logits"], {"images": images.numpy()})
        assert logits.shape == (shape[0], 4)
        assert np.abs(logits - expected).max() <= 1e-4, shape


def test_task_without_onnx_hook_is_named() -> None:
    with pytest.raises(NotImplementedError, match="Linear has no ONNX export: give it an onnx_export_spec"):
        onnx_export_spec(torch.nn.Linear(2, 2))


# ---- detection ------------------------------------------------------------------------------------------
TINY_DINO = {
    "META_ARCHITECTURE": "DINO", "BACKBONE": {"NAME": "build_focalnet_backbone"},
    "FOCALNET": {"EMBED_DIM": 8, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0, "OUT_FEATURES": ["res4", "res5"]},
    "DINO": {"NUM_CLASSES": 3, "IN_FEATURES": ["res4", "res5"], "NUM_FEATURE_LEVELS": 2, "HIDDEN_DIM": 16, "NHEADS": 2,
             "ENC_LAYERS": 1, "DEC_LAYERS": 1, "DIM_FEEDFORWARD": 32, "NUM_QUERIES": 12, "NUM_SELECT": 8, "DN_NUMBER": 0},
}


def detection_checkpoint(tmp_path: Path, model: dict) -> tuple[Path, Path]:
    """A trained-like DetectionTask checkpoint (every parameter perturbed) and its config."""
    from focalnet_pl.tasks.detection import DetectionTask

    torch.manual_seed(0)
    detectron2 = {"MODEL": model}
    task = DetectionTask(detectron2=detectron2)
    with torch.no_grad():
        for parameter in task.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    ckpt = save_task_checkpoint(task, tmp_path / "last.ckpt", call_hook=True)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "focalnet_pl.tasks.detection.DetectionTask",
                                                "init_args": {"detectron2": detectron2}}}))
    return config, ckpt


@pytest.fixture(scope="module")
def dino_onnx(tmp_path_factory) -> tuple[Path, Path, Path, str]:
    """One DINO exported by ``cli.py export --format onnx`` (in-process), shared by the tests below."""
    from focalnet_pl.cli import main

    tmp_path = tmp_path_factory.mktemp("dino_onnx")
    config, ckpt = detection_checkpoint(tmp_path, TINY_DINO)
    output = tmp_path / "dino.onnx"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        main(["export", "--format", "onnx", "--config", str(config), "--ckpt_path", str(ckpt), "--output", str(output)])
    return config, ckpt, output, stdout.getvalue()


@pytest.mark.slow
def test_dino_exports_to_onnx_with_boxes_scores_labels_for_any_size(dino_onnx) -> None:
    config, ckpt, output, printed = dino_onnx
    assert f"wrote {output} (onnxruntime vs PyTorch: max abs difference" in printed
    model = onnx.load(str(output))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert [i.name for i in model.graph.input] == ["images"] and dims == ["batch", 3, "height", "width"]
    assert [o.name for o in model.graph.output] == ["boxes", "scores", "labels"]
    assert {p.key: p.value for p in model.metadata_props}["input_format"] == "BGR"

    # against the PyTorch model's own inference (detectron2 inputs, one image at a time)
    dino = load_task(yaml.safe_load(config.read_text()), ckpt).model
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 96, 128), (2, 3, 77, 45), (1, 3, 160, 97), (1, 3, 64, 64)]:
        images = torch.rand(*shape, generator=generator) * 255
        boxes, scores, labels = session.run(None, {"images": images.numpy()})
        assert boxes.shape == (shape[0], 8, 4) and scores.shape == labels.shape == (shape[0], 8)
        with torch.no_grad():
            expected = [out["instances"] for out in dino([{"image": image} for image in images])]
        for index, instances in enumerate(expected):
            assert np.abs(boxes[index] - instances.pred_boxes.tensor.numpy()).max() <= 1e-4, shape
            assert np.abs(scores[index] - instances.scores.numpy()).max() <= 1e-4, shape
            assert (labels[index] == instances.pred_classes.numpy()).all(), shape


def test_mask_rcnn_onnx_export_says_why_not(tmp_path: Path, capsys) -> None:
    from focalnet_pl.cli import main

    mask_rcnn = {"META_ARCHITECTURE": "PaddingMaskedRCNN", "MASK_ON": True,
                 "BACKBONE": {"NAME": "build_focalnet_fpn_backbone"},
                 "FOCALNET": {"EMBED_DIM": 8, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
                 "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "OUT_CHANNELS": 16},
                 "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"]},
                 "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]]},
                 "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"], "NUM_CLASSES": 2},
                 "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "FC_DIM": 16},
                 "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 1, "CONV_DIM": 8}}
    config, ckpt = detection_checkpoint(tmp_path, mask_rcnn)
    with pytest.raises(SystemExit) as exit_info:
        main(["export", "--format", "onnx", "--config", str(config), "--ckpt_path", str(ckpt),
              "--output", str(tmp_path / "mask_rcnn.onnx")])
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.startswith("error: PaddingMaskedRCNN has no ONNX export: detectron2's proposal and detection")
    assert "Traceback" not in error and not (tmp_path / "mask_rcnn.onnx").exists()


# ---- segmentation -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mask2former_exports_to_onnx_with_semantic_scores_for_any_size(tmp_path: Path) -> None:
    from focalnet_pl.cli import main
    from focalnet_pl.tasks.segmentation import SegmentationTask

    torch.manual_seed(0)
    detectron2 = {"MODEL": {
        "META_ARCHITECTURE": "Mask2Former", "BACKBONE": {"NAME": "build_focalnet_backbone"},
        "PIXEL_MEAN": [123.675, 116.28, 103.53], "PIXEL_STD": [58.395, 57.12, 57.375],
        "FOCALNET": {"EMBED_DIM": 8, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
        "SEM_SEG_HEAD": {"NUM_CLASSES": 3, "IN_FEATURES": ["res2", "res3", "res4", "res5"], "CONVS_DIM": 16,
                         "MASK_DIM": 16, "TRANSFORMER_ENC_LAYERS": 1, "DEFORMABLE_NUM_HEADS": 2,
                         "DEFORMABLE_DIM_FEEDFORWARD": 32},
        "MASK_FORMER": {"HIDDEN_DIM": 16, "NHEADS": 2, "DIM_FEEDFORWARD": 32, "NUM_OBJECT_QUERIES": 6, "DEC_LAYERS": 1,
                        "THING_CLASS_IDS": [0], "TEST": {"SEMANTIC_ON": True, "PANOPTIC_ON": False, "INSTANCE_ON": False}},
    }}
    task = SegmentationTask(detectron2=detectron2)
    with torch.no_grad():  # trained-like weights
        for parameter in task.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    save_task_checkpoint(task, tmp_path / "last.ckpt", call_hook=True)
    config = {"model": {"class_path": "focalnet_pl.tasks.segmentation.SegmentationTask", "init_args": {"detectron2": detectron2}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    output = tmp_path / "mask2former.onnx"
    main(["export", "--format", "onnx", "--config", str(tmp_path / "config.yaml"), "--ckpt_path",
          str(tmp_path / "last.ckpt"), "--output", str(output)])

    model = load_task(config, tmp_path / "last.ckpt").model
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["sem_seg", "class_logits", "mask_logits"]
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 64, 96), (2, 3, 45, 77), (1, 3, 100, 33)]:
        images = torch.rand(*shape, generator=generator) * 255
        scores, class_logits, mask_logits = session.run(None, {"images": images.numpy()})
        assert scores.shape == (shape[0], 3, *shape[2:]) and mask_logits.shape == (shape[0], 6, *shape[2:])
        with torch.no_grad():
            expected = model([{"image": image} for image in images])
        for index, result in enumerate(expected):
            assert np.abs(scores[index] - result["sem_seg"].numpy()).max() <= 1e-4, shape

"""ONNX export (``cli.py export --format onnx``), run as a user would, checked with onnxruntime on CPU."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml

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
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                "pytorch-lightning_version": L.__version__}, ckpt)
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

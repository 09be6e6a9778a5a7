"""Importing ``focalnet_pl`` alone registers every backbone and meta-architecture it provides."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_import_focalnet_pl_registers_backbones_and_meta_architectures() -> None:
    script = textwrap.dedent("""
        import sys
        import focalnet_pl
        from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, build_model

        assert not any(name in sys.modules for name in ("focalnet_pl.tasks", "focalnet_pl.cli")), "imported more than needed"
        registered = {name for name, _ in BACKBONE_REGISTRY} | {name for name, _ in META_ARCH_REGISTRY}
        missing = {"build_focalnet_backbone", "build_focalnet_fpn_backbone", "DINO", "Mask2Former"} - registered
        assert not missing, missing
        tiny = {"DEVICE": "cpu", "BACKBONE": {"NAME": "build_focalnet_backbone"},
                "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1]}}
        dino = build_model(focalnet_pl.d2.build_detectron2_cfg({"MODEL": {**tiny, "META_ARCHITECTURE": "DINO", "DINO": {
            "NUM_CLASSES": 2, "HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 1, "DIM_FEEDFORWARD": 32,
            "NUM_QUERIES": 10, "NUM_SELECT": 10}}}))
        mask2former = build_model(focalnet_pl.d2.build_detectron2_cfg({"MODEL": {
            **tiny, "META_ARCHITECTURE": "Mask2Former",
            "SEM_SEG_HEAD": {"NUM_CLASSES": 2, "IN_FEATURES": ["res2", "res3", "res4", "res5"], "CONVS_DIM": 32, "MASK_DIM": 32,
                             "TRANSFORMER_ENC_LAYERS": 1},
            "MASK_FORMER": {"HIDDEN_DIM": 32, "DEC_LAYERS": 1, "NUM_OBJECT_QUERIES": 4}}}))
        print(type(dino).__name__, type(mask2former).__name__)
    """)
    result = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", script], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["DINO", "Mask2Former"]

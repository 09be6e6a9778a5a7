"""The generated configs (scripts/make_configs.py) are what their template and table give."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def _make_configs():
    spec = importlib.util.spec_from_file_location("make_configs", REPO / "scripts" / "make_configs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_configs_are_up_to_date(capsys) -> None:
    make_configs = _make_configs()
    assert make_configs.main(["--check"]) == 0, capsys.readouterr().out
    assert len(make_configs.render_all()) == 18  # 12 Mask R-CNN, 6 Mask2Former


def test_a_table_change_shows_in_its_file_only() -> None:
    make_configs = _make_configs()
    make_configs.MASK_RCNN_SIZES["b"] = ("base", {"1x": 0.3, "3x": 0.45})
    changed = {path.name: text for path, text in make_configs.render_all().items() if path.read_text() != text}
    assert sorted(changed) == ["mask_rcnn_focalnet_b_lrf_3x.yaml", "mask_rcnn_focalnet_b_srf_3x.yaml"]
    model = yaml.safe_load(changed["mask_rcnn_focalnet_b_lrf_3x.yaml"])["model"]["init_args"]
    assert model["detectron2"]["MODEL"]["FOCALNET"] == {
        "VARIANT": "focalnet_base_lrf", "FOCAL_WINDOWS": [9, 9, 9, 9], "DROP_PATH_RATE": 0.45,
        "OUT_FEATURES": ["res2", "res3", "res4", "res5"], "WEIGHTS": "",
    }
    assert model["lr_decay_epochs"] == [27, 33]

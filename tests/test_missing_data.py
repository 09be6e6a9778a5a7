"""Missing data: every datamodule says what is missing, the layout expected and the option to set;
``cli.py`` prints that as one message (exit status 2) without a traceback unless asked for one."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from datamodules.ade20k import ADE20KPanopticDataModule, ADE20KSemanticDataModule
from datamodules.coco import COCODataModule
from datamodules.coco_panoptic import COCOPanopticDataModule, PanopticDataModule
from datamodules.image_io import DataNotFoundError
from datamodules.imagenet import ImageNetDataModule
from focalnet_pl.cli import DEBUG_ENV, main

REPO = Path(__file__).resolve().parents[1]


def _assert_explains(action: Callable[[], object], missing: str, layout: str, option: str) -> None:
    """``action()`` raises a DataNotFoundError naming ``missing``, the ``layout`` and the ``option``."""
    with pytest.raises(DataNotFoundError) as error:
        action()
    message = str(error.value)
    assert message.startswith(f"Data not found: {missing}"), message
    assert f"Expected layout:\n  {layout}" in message and f"Set {option}" in message, message


@pytest.mark.slow
def test_dino_h_fit_without_coco_fails_fast_with_one_message() -> None:
    """As a new user would run it: no traceback, no ``[rank0]:`` lines, before any model is built."""
    result = subprocess.run(
        [sys.executable, "cli.py", "fit", "--config", "configs/dino_focalnet_h.yaml", "--data.init_args.root", "/nonexistent"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != DEBUG_ENV},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "[rank0]:" not in result.stderr, result.stderr[-3000:]
    assert "error: Data not found: COCO root folder /nonexistent.\nExpected layout:\n" \
           "  <root>/annotations/instances_train2017.json, instances_val2017.json" in result.stderr
    assert "Set --data.init_args.root to your COCO folder." in result.stderr
    assert "Initializing distributed" not in result.stdout + result.stderr  # stopped before the trainer ran


def _classification_config(tmp_path: Path, root: Path) -> Path:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "focalnet_pl.tasks.ClassificationTask",
                  "init_args": {"model_overrides": {"embed_dim": 8, "depths": [1, 1, 1, 1]}}},
        "data": {"class_path": "datamodules.ImageNetDataModule", "init_args": {"root": str(root)}},
        "trainer": {"accelerator": "cpu", "logger": False},
    }))
    return config


@pytest.mark.slow
def test_cli_prints_the_message_and_keeps_the_traceback_for_debug(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    config = _classification_config(tmp_path, tmp_path / "imagenet")
    with pytest.raises(SystemExit) as exit_info:
        main(["validate", "--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: Data not found: dataset root {tmp_path / 'imagenet'}.\nExpected layout:\n" \
           "  <root>/train/<class_name>/<image files>" in err
    assert "Traceback" not in err and "--debug" in err
    with pytest.raises(Exception) as debug_info:  # noqa: PT011 - jsonargparse wraps the datamodule's error
        main(["validate", "--config", str(config), "--debug"])
    assert isinstance(debug_info.value.__cause__ or debug_info.value, DataNotFoundError)
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(Exception, match="Data not found"):  # noqa: PT011
        main(["validate", "--config", str(config)])


def test_imagenet_split_folder_missing(tmp_path: Path) -> None:
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "0.jpg").write_bytes(b"")
    datamodule = ImageNetDataModule(root=str(tmp_path), num_workers=0)
    _assert_explains(lambda: datamodule.setup("validate"), f"split folder {tmp_path / 'val'}",
                     "<root>/train/<class_name>/<image files>", "--data.init_args.root to the folder holding the split")


def test_coco_missing_root_split_and_predict_folder(tmp_path: Path) -> None:
    coco = tmp_path / "coco"
    _assert_explains(lambda: COCODataModule(root=str(coco)), f"COCO root folder {coco}",
                     "<root>/annotations/instances_train2017.json", "--data.init_args.root to your COCO folder")
    (coco / "val2017").mkdir(parents=True)
    _assert_explains(lambda: COCODataModule(root=str(coco)).setup("validate"),
                     f"COCO val annotation file {coco / 'annotations/instances_val2017.json'}.",
                     "<root>/annotations/instances_train2017.json",
                     "--data.init_args.root to your COCO folder, or --data.init_args.val_json and --data.init_args.val_images")
    explicit = COCODataModule(train_json=str(tmp_path / "t.json"), train_images=str(coco / "val2017"))
    with pytest.raises(DataNotFoundError, match=r"(?s)COCO train annotation file .*t\.json\.\n.*\nSet --data.init_args"
                                                r"\.train_json and --data.init_args\.train_images\.$"):
        explicit.dataset_name("train")
    with pytest.raises(DataNotFoundError, match="predict image folder .*nowhere does not exist.*predict_images"):
        COCODataModule(predict_images=str(tmp_path / "nowhere")).setup("predict")
    with pytest.raises(DataNotFoundError, match="predict image folder .*val2017 holds no image files"):
        COCODataModule(predict_images=str(coco / "val2017")).setup("predict")


def test_segmentation_datamodules_missing_data(tmp_path: Path) -> None:
    coco, ade = tmp_path / "coco", tmp_path / "ade"
    panoptic_layout = "<root>/annotations/panoptic_{train,val}2017.json"
    _assert_explains(lambda: COCOPanopticDataModule(root=str(coco)), f"COCO root folder {coco}", panoptic_layout,
                     "--data.init_args.root to your COCO folder")
    coco.mkdir()
    _assert_explains(lambda: COCOPanopticDataModule(root=str(coco)).num_classes,
                     f"COCOPanopticDataModule train annotation file {coco / 'annotations/panoptic_train2017.json'}"
                     f" and image folder {coco / 'train2017'} and panoptic PNG folder", panoptic_layout,
                     "--data.init_args.root to your COCO folder")
    explicit = PanopticDataModule(val_json=str(tmp_path / "v.json"), val_images=str(tmp_path), val_panoptic=str(tmp_path))
    _assert_explains(lambda: explicit.setup("validate"), f"PanopticDataModule val annotation file {tmp_path / 'v.json'}.",
                     "val_json: panopticapi json",
                     "--data.init_args.val_json, --data.init_args.val_images and --data.init_args.val_panoptic")

    ade_option = "--data.init_args.root to the folder holding ADEChallengeData2016/"
    _assert_explains(lambda: ADE20KSemanticDataModule(root=str(ade)), f"ADE20K root folder {ade}",
                     "<root>/ADEChallengeData2016/images/", ade_option)
    _assert_explains(lambda: ADE20KPanopticDataModule(root=str(ade)), f"ADE20K root folder {ade}",
                     "<root>/ADEChallengeData2016/ade20k_panoptic_{train,val}.json", ade_option)
    (ade / "ADEChallengeData2016").mkdir(parents=True)
    _assert_explains(lambda: ADE20KSemanticDataModule(root=str(ade)).setup("fit"),
                     f"ADE20K folder {ade / 'ADEChallengeData2016/images/training'}",
                     "<root>/ADEChallengeData2016/images/{training,validation}/<image files>", ade_option)
    with pytest.raises(DataNotFoundError, match="ade20k_panoptic_train.json"):
        _ = ADE20KPanopticDataModule(root=str(ade)).num_classes

"""Bad-input catalogue: each bad input across tasks gets a clear error naming it, or a handled result."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.coco import DroppedAnnotationsWarning, load_coco_instances
from datamodules.image_io import (
    EmptyDatasetError,
    ImageReadError,
    SafeImageFolder,
    read_image_rgb,
)
from datamodules.imagenet import ImageNetDataModule
from datamodules.segmentation import LabelFileError, read_label_png
from focalnet_pl import create_focalnet
from datamodules.loading import DataLoadError, GuardedCollate, GuardedDataset, GuardedLoader
from focalnet_pl.reliability import AtomicCheckpointIO, NonFiniteLossError
from focalnet_pl.tasks import ClassificationTask
from focalnet_pl.weights import CheckpointError, read_state_dict

TINY = {"embed_dim": 8, "depths": (1, 1, 1, 1)}


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _rgb(size: int = 16) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)


def _coco(tmp: Path, annotations: list[dict] | None = None, drop: str | None = None) -> Path:
    _png(tmp / "images" / "a.png", _rgb(32))
    data = {
        "images": [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
        "categories": [{"id": 7, "name": "thing"}],
        "annotations": annotations if annotations is not None else
        [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}],
    }
    if drop:
        del data[drop]
    path = tmp / "instances.json"
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------------- images
def test_corrupt_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG body" * 10)
    with pytest.raises(ImageReadError, match="broken.jpg"):
        read_image_rgb(path)


def test_truncated_png(tmp_path: Path) -> None:
    path = _png(tmp_path / "cut.png", _rgb(64))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_image_rgb(path)


def test_grayscale_image(tmp_path: Path) -> None:
    image = read_image_rgb(_png(tmp_path / "gray.png", np.full((8, 8), 90, np.uint8), "L"))
    assert image.mode == "RGB" and np.asarray(image)[0, 0].tolist() == [90, 90, 90]


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    pixel = np.asarray(read_image_rgb(path))[4, 4]
    assert pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60


def test_rgba_image(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    image = np.asarray(read_image_rgb(_png(tmp_path / "alpha.png", rgba, "RGBA")))
    assert image[0, 0].tolist() == [255, 0, 0] and image[7, 7].tolist() == [255, 255, 255]


def test_huge_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _png(tmp_path / "huge.png", _rgb(64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2 * 1000: a decompression bomb
    with pytest.raises(ImageReadError, match="huge.png.*DecompressionBomb"):
        read_image_rgb(path)


def test_image_smaller_than_patch() -> None:
    model = create_focalnet("focalnet_tiny_srf", num_classes=3, **TINY).eval()
    assert model(torch.rand(1, 3, 2, 3)).shape == (1, 3)  # padded internally to the patch size
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\)"):
        model(torch.rand(3, 2, 2))


def test_nan_in_input() -> None:
    task = ClassificationTask(num_classes=3, model_overrides=TINY, mixup_alpha=0, cutmix_alpha=0)
    batch = (torch.full((2, 3, 16, 16), float("nan")), torch.tensor([0, 1]))
    with pytest.raises(NonFiniteLossError, match=r"Non-finite loss nan at global step 0 .*cross_entropy=nan \[non-finite\]"):
        task.training_step(batch, 0)
    skipping = ClassificationTask(num_classes=3, model_overrides=TINY, mixup_alpha=0, cutmix_alpha=0,
                                  on_nonfinite_loss="skip")
    assert skipping.training_step(batch, 0) is None  # Lightning skips backward and the optimizer step
    assert skipping.loss_guard.skipped_steps == 1


def test_unreadable_sample_in_worker(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "train" / "a" / f"{i}.png", _rgb())
    (tmp_path / "train" / "a" / "1.png").write_bytes(b"garbage")
    dataset = SafeImageFolder(tmp_path / "train", transform=lambda image: torch.from_numpy(np.asarray(image).copy()))
    loader = GuardedLoader(GuardedDataset(dataset), batch_size=3, num_workers=1, collate_fn=GuardedCollate(),
                           name="train_dataloader")
    # the worker does not raise: the failure travels to the main process, where the loader names it
    with pytest.raises(DataLoadError, match=r"train_dataloader batch 0: failed to load 1 sample.*sample 1 \(file .*a/1.png\)"):
        next(iter(loader))
    # end to end: fit stops in the main process with the file and the index, not a worker traceback
    _png(tmp_path / "train" / "b" / "0.png", _rgb())
    datamodule = ImageNetDataModule(root=str(tmp_path), image_size=16, batch_size=4, num_workers=1, val_split="train",
                                    test_split=None, randaugment_num_ops=0, random_erasing_prob=0.0)
    task = ClassificationTask(model_overrides=TINY, mixup_alpha=0, cutmix_alpha=0, lr_reference_batch=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    with pytest.raises(DataLoadError, match=r"train_dataloader batch 0: failed to load 1 sample\(s\) of "
                                            r"SafeImageFolder at .*train - sample 1 \(file .*a/1.png\): ImageReadError"):
        trainer.fit(task, datamodule)
    assert "train_dataloader" not in vars(datamodule)  # the loader wrapper is removed after the run


# --------------------------------------------------------------------------- labels and annotations
def test_label_png_16bit(tmp_path: Path) -> None:
    small = np.array([[0, 3], [150, 2]], np.uint16)
    assert Image.fromarray(small).mode == "I;16"
    assert read_label_png(_png(tmp_path / "ok16.png", small)).tolist() == [[0, 3], [150, 2]]
    with pytest.raises(LabelFileError, match="bad16.png has values > 255"):
        read_label_png(_png(tmp_path / "bad16.png", np.array([[0, 300]], np.uint16)))


def test_malformed_json(tmp_path: Path) -> None:
    path = _coco(tmp_path)
    path.write_text(path.read_text()[:-5])
    with pytest.raises(ValueError, match="malformed COCO annotation json .*instances.json"):
        load_coco_instances(path, tmp_path / "images")


def test_missing_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="missing list 'annotations'"):
        load_coco_instances(_coco(tmp_path, drop="annotations"), tmp_path / "images")


def test_unknown_category_id(tmp_path: Path) -> None:
    ann = [{"id": 1, "image_id": 1, "category_id": 99, "bbox": [0, 0, 4, 4], "area": 16, "iscrowd": 0}]
    with pytest.raises(ValueError, match=r"annotations\[0\].* unknown category_id 99"):
        load_coco_instances(_coco(tmp_path, ann), tmp_path / "images")


def test_zero_area_box(tmp_path: Path) -> None:
    anns = [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 2, 0, 5], "area": 0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [2, 2, 5, 5], "area": 25, "iscrowd": 0}]
    with pytest.warns(DroppedAnnotationsWarning, match="dropped 1 of 2 annotations .*degenerate box"):
        records, _ = load_coco_instances(_coco(tmp_path, anns), tmp_path / "images")
    assert len(records[0]["annotations"]) == 1


def test_box_only_annotations_among_masks(tmp_path: Path) -> None:
    """Users' own data: boxes for every object, masks for some. Mask R-CNN trains (the mask head on the
    objects with a mask) and is evaluated (box-only objects are ignore regions for mask AP)."""
    from helpers import SMALL_IMAGES, tiny_detectron2, write_tiny_coco

    from datamodules.coco import BoxOnlyAnnotationsWarning, COCODataModule
    from focalnet_pl.tasks.detection import DetectionTask

    json_file = write_tiny_coco(tmp_path, "train2017", num_images=6, size=64, with_crowd=False)
    data = json.loads(json_file.read_text())
    for ann in data["annotations"][::2]:
        del ann["segmentation"]
    json_file.write_text(json.dumps(data))
    images = str(tmp_path / "train2017")
    datamodule = COCODataModule(train_json=str(json_file), train_images=images, val_json=str(json_file),
                                val_images=images, **SMALL_IMAGES)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    task = DetectionTask(detectron2=tiny_detectron2(), lr=1e-3)
    with pytest.warns(BoxOnlyAnnotationsWarning, match=r"instances_train2017.json: 3 of 6 annotations have a box but "
                                                        r"no segmentation \(ids \[1, 3, 5\]\)"):
        trainer.fit(task, datamodule)
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train/loss_mask"]) and metrics["val/segm_AP"] >= 0


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "train" / "cats").mkdir(parents=True)
    with pytest.raises(EmptyDatasetError, match="class folder .*cats contains no image files"):
        ImageNetDataModule(root=str(tmp_path), num_workers=0).setup("fit")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(EmptyDatasetError, match=r"Data not found: split folder .*nothing/train \(or .*nothing/val\)"):
        ImageNetDataModule(root=str(tmp_path / "nothing"))


# ------------------------------------------------------------------------------ models and configs
def test_wrong_num_classes_vs_checkpoint(tmp_path: Path) -> None:
    from focalnet_pl.export import load_task

    task = ClassificationTask(num_classes=5, model_overrides=TINY)
    path = tmp_path / "five.ckpt"
    hparams = dict(task.hparams) | {"num_classes": 3}  # a checkpoint whose weights and config disagree
    torch.save({"state_dict": task.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": L.__version__},
               path)
    config = {"model": {"class_path": "focalnet_pl.tasks.ClassificationTask"}}
    with pytest.raises(CheckpointError, match=r"(?s)five.ckpt does not fit ClassificationTask.*size mismatch for model.head.weight"):
        load_task(config, path)
    # fine-tuning from the 5-class weights to 3 classes: the head is re-initialised (handled)
    weights = tmp_path / "five.pth"
    torch.save(task.model.state_dict(), weights)
    finetune = create_focalnet("focalnet_tiny_srf", num_classes=3, weights=str(weights), **TINY)
    torch.testing.assert_close(finetune.patch_embed.proj.weight, task.model.patch_embed.proj.weight)
    assert finetune.head.out_features == 3


@pytest.mark.slow
def test_unknown_config_key(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from focalnet_pl.cli import FocalNetCLI

    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  class_path: focalnet_pl.tasks.ClassificationTask\n  init_args:\n"
                      "    num_classes: 3\n    learning_rate_typo: 0.1\n")
    with pytest.raises(SystemExit):
        FocalNetCLI(args=["fit", "--config", str(config)], run=False)
    assert "learning_rate_typo" in capsys.readouterr().err


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="Unknown FocalNet variant 'focalnet_tiny_xyz'. Valid names: focalnet_tiny_srf"):
        create_focalnet("focalnet_tiny_xyz")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="Refused to load .*evil.ckpt.*would run code"):
        read_state_dict(path)
    with pytest.raises(CheckpointError, match="Refused to load .*evil.ckpt.*would run code"):
        AtomicCheckpointIO().load_checkpoint(path)
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(CheckpointError):
        read_state_dict(plain)
    assert not marker.exists()


def test_weights_url_not_https() -> None:
    for url in ("http://example.com/w.pth", "ftp://example.com/w.pth", "file:///etc/passwd"):
        with pytest.raises(CheckpointError, match="only https URLs are allowed"):
            create_focalnet("focalnet_tiny_srf", weights=url, **TINY)


def test_weights_path_with_shell_syntax(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    for path in (f"$(touch {marker}).pth", f"`touch {marker}`.pth", "$HOME/w.pth"):
        with pytest.raises(CheckpointError, match="not found: " + path.replace("$", r"\$").replace("(", r"\(")
                           .replace(")", r"\)").replace(".", r"\.")):
            create_focalnet("focalnet_tiny_srf", weights=path, **TINY)
    assert not marker.exists()

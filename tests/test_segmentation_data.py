"""Segmentation data: ADE20K semantic and panopticapi-format datasets, augmentations, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.ade20k import ADE20KPanopticDataModule, ADE20KSemanticDataModule
from datamodules.coco_panoptic import PanopticDataModule, load_panoptic_json
from datamodules.segmentation import IGNORE_LABEL, LabelFileError, build_segmentation_augmentations


def _write_ade(root: Path, size: tuple[int, int] = (48, 64), label_size: tuple[int, int] | None = None) -> Path:
    base = root / "ADEChallengeData2016"
    for split in ("training", "validation"):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for index in range(2):
            height, width = size
            image = np.full((height, width, 3), 40 * index, np.uint8)
            label = np.zeros(label_size or size, np.uint8)  # 0 = unlabelled
            label[: height // 2] = 1  # class 0
            label[height // 2 :, : width // 2] = 3  # class 2
            Image.fromarray(image).save(base / "images" / split / f"ADE_{split}_{index}.jpg")
            Image.fromarray(label).save(base / "annotations" / split / f"ADE_{split}_{index}.png")
    return root


def _write_panoptic(root: Path, extra_png_id: int | None = None) -> tuple[Path, Path, Path]:
    """Two 40x40 images: stuff "sky" (id 50) above, a thing "box" (id 7) and a crowd box (id 8) below."""
    images, pngs = root / "images", root / "panoptic"
    images.mkdir(parents=True)
    pngs.mkdir()
    annotations = []
    for image_id in (1, 2):
        ids = np.zeros((40, 40), np.int64)
        ids[:20] = 50
        ids[25:35, 5:15] = 7
        ids[25:35, 25:35] = 8
        if extra_png_id is not None:
            ids[0, 0] = extra_png_id
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(images / f"{image_id}.jpg")
        Image.fromarray(rgb).save(pngs / f"{image_id}.png")
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": [
            {"id": 50, "category_id": 30, "iscrowd": 0},
            {"id": 7, "category_id": 4, "iscrowd": 0},
            {"id": 8, "category_id": 4, "iscrowd": 1},
        ]})
    json_file = root / "panoptic.json"
    json_file.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": 40, "width": 40} for i in (1, 2)],
        "annotations": annotations,
        "categories": [{"id": 4, "name": "box", "isthing": 1}, {"id": 30, "name": "sky", "isthing": 0}],
    }))
    return json_file, images, pngs


def _panoptic_module(root: Path, **kwargs) -> PanopticDataModule:
    json_file, images, pngs = _write_panoptic(root, **kwargs)
    return PanopticDataModule(
        train_json=str(json_file), train_images=str(images), train_panoptic=str(pngs),
        val_json=str(json_file), val_images=str(images), val_panoptic=str(pngs),
        augmentation="none", test_size=40, test_max_size=40, num_workers=0,
    )


def test_ade_semantic_labels_are_shifted_and_zero_is_ignored(tmp_path: Path) -> None:
    module = ADE20KSemanticDataModule(root=str(_write_ade(tmp_path)), class_names=["a", "b", "c"],
                                      augmentation="none", test_size=48, num_workers=0)
    module.setup("fit")
    train = module._datasets["train"][0]
    assert train["image"].shape == (3, 48, 64) and train["image"].dtype == torch.uint8
    assert train["instances"].gt_classes.tolist() == [0, 2]  # labels 1 and 3, shifted by one
    masks = train["instances"].gt_masks
    assert masks[0, :24].all() and not masks[0, 24:].any()
    assert masks.sum() == 48 * 64 - 24 * 32  # the unlabelled quarter belongs to no mask
    val = module._datasets["val"][0]
    assert set(val["sem_seg_gt"].unique().tolist()) == {0, 2, IGNORE_LABEL}
    assert module.metadata.stuff_classes == ["a", "b", "c"]
    assert module.metadata.evaluator_type == "semantic"


def test_ade_recipe_crops_and_keeps_labels_aligned(tmp_path: Path) -> None:
    # min_scale 1: the shortest side is resized to at least the crop size (at 0.5 it can be smaller than the crop)
    module = ADE20KSemanticDataModule(root=str(_write_ade(tmp_path, size=(96, 128))), class_names=["a", "b", "c"],
                                      crop_size=64, min_scale=1.0, num_workers=0, batch_size=2)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    for record in batch:
        assert record["image"].shape[1:] == (64, 64)
        assert record["instances"].gt_masks.shape[1:] == (64, 64)


def test_lsj_pads_segmentation_with_the_given_value() -> None:
    augmentations = build_segmentation_augmentations(True, "lsj", crop_size=64, seg_pad_value=0, min_scale=0.25,
                                                     max_scale=0.25, photometric=True)
    from detectron2.data import transforms as T

    image = np.full((64, 64, 3), 200, np.uint8)
    label = np.full((64, 64), 9, np.uint8)
    aug_input = T.AugInput(image, sem_seg=label)
    T.AugmentationList(augmentations)(aug_input)
    assert aug_input.image.shape == (64, 64, 3)
    assert (aug_input.sem_seg == 9).sum() == 16 * 16  # scaled to a quarter, padded with 0
    assert set(np.unique(aug_input.sem_seg).tolist()) == {0, 9}


def test_ade_label_with_other_size_names_both_files(tmp_path: Path) -> None:
    module = ADE20KSemanticDataModule(root=str(_write_ade(tmp_path, label_size=(40, 64))), class_names=["a", "b", "c"],
                                      augmentation="none", num_workers=0)
    module.setup("fit")
    with pytest.raises(LabelFileError, match=r"ADE_training_0\.png is 64x40 but its image .*ADE_training_0\.jpg is 64x48"):
        module._datasets["train"][0]


def test_ade_label_values_beyond_the_classes_are_an_error(tmp_path: Path) -> None:
    module = ADE20KSemanticDataModule(root=str(_write_ade(tmp_path)), class_names=["a", "b"],
                                      augmentation="none", num_workers=0)
    module.setup("fit")
    with pytest.raises(LabelFileError, match=r"ADE_training_0\.png .*values \[3\] above the 2 classes"):
        module._datasets["train"][0]


def test_ade_image_without_label_is_an_error(tmp_path: Path) -> None:
    root = _write_ade(tmp_path)
    (root / "ADEChallengeData2016" / "annotations" / "validation" / "ADE_validation_1.png").unlink()
    module = ADE20KSemanticDataModule(root=str(root), class_names=["a", "b", "c"], num_workers=0)
    with pytest.raises(FileNotFoundError, match=r"ADE_validation_1\.jpg has no label PNG"):
        module.setup("validate")


def test_panoptic_records_map_categories_and_skip_crowd_in_training(tmp_path: Path) -> None:
    module = _panoptic_module(tmp_path)
    module.setup("fit")
    assert module.metadata.stuff_classes == ["box", "sky"]
    assert module.metadata.thing_class_ids == [0]
    train = module._datasets["train"][0]
    assert train["instances"].gt_classes.tolist() == [1, 0]  # sky, box; the crowd box is left out
    assert train["instances"].gt_masks.sum((1, 2)).tolist() == [800, 100]
    val = module._datasets["val"][0]
    assert val["pan_seg_gt"].shape == (40, 40)
    assert [(s["id"], s["category_id"], s["iscrowd"]) for s in val["segments_info"]] == [(50, 1, 0), (7, 0, 0), (8, 0, 1)]
    assert int((val["sem_seg_gt"] == IGNORE_LABEL).sum()) == 40 * 40 - 800 - 200


def test_panoptic_png_with_ids_unknown_to_the_json_names_both_files(tmp_path: Path) -> None:
    module = _panoptic_module(tmp_path, extra_png_id=12345)
    module.setup("fit")
    with pytest.raises(LabelFileError, match=r"panoptic[/\\]1\.png has segment ids \[12345\] .*panoptic\.json"):
        module._datasets["train"][0]


def test_panoptic_png_with_other_size_names_both_files(tmp_path: Path) -> None:
    module = _panoptic_module(tmp_path)
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "panoptic" / "2.png")
    module.setup("fit")
    with pytest.raises(LabelFileError, match=r"panoptic[/\\]2\.png is 40x30 but its image .*images[/\\]2\.jpg is 40x40"):
        module._datasets["train"][1]


def test_panoptic_json_with_unknown_category_is_an_error(tmp_path: Path) -> None:
    json_file, images, pngs = _write_panoptic(tmp_path)
    data = json.loads(json_file.read_text())
    data["annotations"][1]["segments_info"][0]["category_id"] = 99
    json_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"panoptic\.json: annotations\[1\].*unknown category_id 99"):
        load_panoptic_json(json_file, images, pngs)


def test_ade20k_panoptic_layout(tmp_path: Path) -> None:
    base = tmp_path / "ADEChallengeData2016"
    for split, folder in (("train", "training"), ("val", "validation")):
        json_file, images, pngs = _write_panoptic(tmp_path / split)
        (base / "images").mkdir(parents=True, exist_ok=True)
        images.rename(base / "images" / folder)
        pngs.rename(base / f"ade20k_panoptic_{split}")
        json_file.rename(base / f"ade20k_panoptic_{split}.json")
    module = ADE20KPanopticDataModule(root=str(tmp_path), crop_size=32, num_workers=0)
    module.setup("fit")
    assert module.metadata.evaluator_type == "panoptic"
    assert max(module._datasets["train"][0]["image"].shape[1:]) <= 32  # crops of at most 32 px
    assert module._datasets["val"][1]["pan_seg_gt"].shape == (40, 40)


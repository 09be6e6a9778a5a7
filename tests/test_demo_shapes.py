"""The generated demo-shapes dataset: determinism, atomic ensure, and validity of every format."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from datamodules.demo_shapes import (
    ADE_CLASS_NAMES,
    DATASET_VERSION,
    MARKER_FILE,
    SHAPE_CLASSES,
    STUFF_CATEGORIES,
    THING_CATEGORIES,
    DemoShapesSizes,
    ensure_demo_shapes,
    generate_demo_shapes,
    uncompressed_rle,
)

SMALL = DemoShapesSizes(
    classification_train_per_class=4, classification_val_per_class=2, scenes_train=24, scenes_val=8
)
SCENE = 128


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_shapes(tmp_path_factory.mktemp("demo") / "demo_shapes", sizes=SMALL)


def test_generation_is_deterministic_and_seed_dependent(demo_root: Path, tmp_path: Path) -> None:
    again = generate_demo_shapes(tmp_path / "again", seed=0, sizes=SMALL)
    reference = tree_digest(demo_root)
    assert tree_digest(again) == reference
    other_seed = generate_demo_shapes(tmp_path / "seed1", seed=1, sizes=SMALL)
    other = tree_digest(other_seed)
    assert other.keys() == reference.keys()
    assert sum(other[name] != reference[name] for name in reference) > 0.9 * len(reference)


def test_ensure_reuses_complete_dataset_and_refuses_foreign_folders(demo_root: Path, tmp_path: Path) -> None:
    marker = demo_root / MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    assert ensure_demo_shapes(demo_root, sizes=SMALL) == demo_root
    assert marker.stat().st_mtime_ns == stamp

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="foreign"):
        ensure_demo_shapes(foreign, sizes=SMALL)
    with pytest.raises(FileExistsError):
        generate_demo_shapes(foreign, sizes=SMALL)


def test_outdated_dataset_is_replaced_atomically(tmp_path: Path) -> None:
    tiny = DemoShapesSizes(1, 1, 2, 1)
    root = ensure_demo_shapes(tmp_path / "shapes", sizes=tiny)
    meta = json.loads((root / MARKER_FILE).read_text())
    assert meta["version"] == DATASET_VERSION and meta["seed"] == 0
    meta["version"] = DATASET_VERSION - 1
    (root / MARKER_FILE).write_text(json.dumps(meta))
    (root / "stale.txt").write_text("left by an older version")
    ensure_demo_shapes(root, sizes=tiny)
    assert not (root / "stale.txt").exists()
    assert json.loads((root / MARKER_FILE).read_text())["version"] == DATASET_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapes"]  # no staging leftovers


def test_classification_split_is_an_imagefolder(demo_root: Path) -> None:
    for split, per_class in (("train", SMALL.classification_train_per_class), ("val", SMALL.classification_val_per_class)):
        split_dir = demo_root / "classification" / split
        assert sorted(p.name for p in split_dir.iterdir()) == sorted(SHAPE_CLASSES)
        for class_dir in split_dir.iterdir():
            files = sorted(class_dir.glob("*.png"))
            assert len(files) == per_class
            with Image.open(files[0]) as image:
                assert image.mode == "RGB" and image.size == (64, 64)


def test_coco_instances_are_valid_and_exact(demo_root: Path) -> None:
    saw_crowd = saw_empty = False
    for split, count in (("train2017", SMALL.scenes_train), ("val2017", SMALL.scenes_val)):
        coco = COCO(str(demo_root / "coco" / "annotations" / f"instances_{split}.json"))
        assert sorted(coco.getCatIds()) == [1, 3, 5, 7, 9]  # non-contiguous on purpose
        assert len(coco.getImgIds()) == count
        for image_id in coco.getImgIds():
            info = coco.imgs[image_id]
            with Image.open(demo_root / "coco" / split / info["file_name"]) as image:
                assert image.format == "JPEG" and image.size == (info["width"], info["height"]) == (SCENE, SCENE)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            saw_empty |= not annotations
            union = np.zeros((SCENE, SCENE), dtype=int)
            for ann in annotations:
                mask = coco.annToMask(ann)
                union += mask
                x, y, w, h = ann["bbox"]
                assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= SCENE and y + h <= SCENE
                assert ann["bbox"] == mask_utils.toBbox(mask_utils.encode(np.asfortranarray(mask))).tolist()
                assert ann["area"] == int(mask.sum()) > 0
                if ann["iscrowd"]:
                    saw_crowd = True
                    assert isinstance(ann["segmentation"]["counts"], list)
                else:
                    (polygon,) = ann["segmentation"]
                    assert len(polygon) >= 6 and len(polygon) % 2 == 0
                    assert min(polygon) >= 0 and max(polygon) <= SCENE
            assert union.max(initial=0) <= 1  # instances never overlap
    assert saw_crowd and saw_empty


def test_uncompressed_rle_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    for mask in (rng.random((7, 5)) > 0.5, np.ones((4, 3), bool), np.zeros((3, 3), bool)):
        rle = uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size
        decoded = mask_utils.decode(mask_utils.frPyObjects(rle, *mask.shape))
        np.testing.assert_array_equal(decoded, mask)


def _panoptic_ids(path: Path) -> np.ndarray:
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.int64)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256**2 * rgb[..., 2]


def test_panoptic_and_semantic_agree_with_instances(demo_root: Path) -> None:
    thing_ids = [c["id"] for c in THING_CATEGORIES]
    stuff_ids = [c["id"] for c in STUFF_CATEGORIES]
    category_to_label = {cat_id: index + 1 for index, cat_id in enumerate(thing_ids + stuff_ids)}
    assert len(ADE_CLASS_NAMES) == len(category_to_label)
    for split, ade_split in (("train2017", "training"), ("val2017", "validation")):
        panoptic = json.loads((demo_root / "coco" / "annotations" / f"panoptic_{split}.json").read_text())
        categories = {c["id"]: c for c in panoptic["categories"]}
        assert {i for i, c in categories.items() if c["isthing"]} == set(thing_ids)
        assert {i for i, c in categories.items() if not c["isthing"]} == set(stuff_ids)
        coco = COCO(str(demo_root / "coco" / "annotations" / f"instances_{split}.json"))
        ade_images = sorted((demo_root / "ade" / "ADEChallengeData2016" / "images" / ade_split).glob("*.jpg"))
        ade_labels = sorted((demo_root / "ade" / "ADEChallengeData2016" / "annotations" / ade_split).glob("*.png"))
        assert len(ade_images) == len(ade_labels) == len(panoptic["annotations"])

        for index, ann in enumerate(panoptic["annotations"]):
            ids = _panoptic_ids(demo_root / "coco" / f"panoptic_{split}" / ann["file_name"])
            segments = {s["id"]: s for s in ann["segments_info"]}
            assert set(np.unique(ids)) - {0} == set(segments)
            semantic = np.asarray(Image.open(ade_labels[index]))
            assert semantic.dtype == np.uint8 and semantic.max() <= len(ADE_CLASS_NAMES)
            np.testing.assert_array_equal(semantic == 0, ids == 0)
            assert 0 < (ids == 0).sum() < 0.1 * ids.size  # a thin unlabelled horizon band

            instances = coco.loadAnns(coco.getAnnIds(imgIds=ann["image_id"]))
            thing_segments = [s for s in segments.values() if categories[s["category_id"]]["isthing"]]
            assert len(thing_segments) == len(instances)
            for segment in segments.values():
                mask = ids == segment["id"]
                assert segment["area"] == int(mask.sum())
                ys, xs = np.nonzero(mask)
                assert segment["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
                assert (semantic[mask] == category_to_label[segment["category_id"]]).all()
                if categories[segment["category_id"]]["isthing"]:
                    matches = [a for a in instances if np.array_equal(coco.annToMask(a).astype(bool), mask)]
                    assert len(matches) == 1
                    assert matches[0]["category_id"] == segment["category_id"]
                    assert matches[0]["iscrowd"] == segment["iscrowd"]
            coco_jpeg = demo_root / "coco" / split / coco.imgs[ann["image_id"]]["file_name"]
            assert ade_images[index].read_bytes() == coco_jpeg.read_bytes()

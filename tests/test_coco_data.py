"""COCO datamodule: loading, id mapping, cleaning of bad annotations, errors, mapper and batches.

``write_tiny_coco`` (also used by the other detection tests) writes a small but real COCO dataset:
JPEG-free PNG images with filled shapes and an instances json with polygons, an RLE crowd region,
non-contiguous category ids and an image without annotations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import BitMasks, PolygonMasks
from PIL import Image
from pycocotools import mask as mask_utils

from datamodules import coco as coco_module
from datamodules.coco import (
    COCODataModule,
    COCOInstanceMapper,
    DroppedAnnotationsWarning,
    build_augmentations,
    load_coco_instances,
)
from helpers import write_tiny_coco, write_tiny_coco_layout


def small_datamodule(root: Path, **kwargs) -> COCODataModule:
    """Datamodule with small images and no workers (fast tests)."""
    options = dict(root=str(root), train_min_sizes=[64], train_max_size=96, crop_resize_sizes=[48, 64],
                   crop_size=[32, 48], test_min_size=64, test_max_size=96, batch_size=2, eval_batch_size=2,
                   num_workers=0)
    options.update(kwargs)
    return COCODataModule(**options)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def test_standard_layout_registers_datasets_with_contiguous_ids(tmp_path):
    dm = small_datamodule(write_tiny_coco_layout(tmp_path))
    dm.setup("fit")
    assert dm.num_classes == 2
    meta = dm.metadata
    assert meta.thing_classes == ["square", "triangle"]
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.evaluator_type == "coco" and Path(meta.json_file) == (tmp_path / "annotations" / "instances_train2017.json").resolve()
    records = DatasetCatalog.get(dm.dataset_name("train"))
    assert [r["image_id"] for r in records] == [10, 15, 20, 25]
    assert records[0]["annotations"] == []  # image without annotations kept as a negative
    assert {a["category_id"] for r in records for a in r["annotations"]} == {0, 1}
    # names are unique per json + image folder and registration is idempotent
    other = small_datamodule(write_tiny_coco_layout(tmp_path / "other"))
    assert other.dataset_name("train") != dm.dataset_name("train")
    assert small_datamodule(tmp_path).dataset_name("train") == dm.dataset_name("train")
    assert dm.dataset_name("test") != dm.dataset_name("train")
    assert MetadataCatalog.get(dm.dataset_name("test")).json_file == MetadataCatalog.get(dm.dataset_name("val")).json_file


def test_explicit_json_and_image_folder_per_split(tmp_path):
    train_json = write_tiny_coco(tmp_path / "a", "imgs", num_images=3)
    val_json = write_tiny_coco(tmp_path / "b", "pics", num_images=2, seed=3)
    dm = COCODataModule(train_json=str(train_json), train_images=str(tmp_path / "a" / "imgs"),
                        val_json=str(val_json), val_images=str(tmp_path / "b" / "pics"), num_workers=0)
    dm.setup("fit")
    assert len(dm._datasets["train"]) == 3 and len(dm._datasets["val"]) == 2
    dm.setup("test")  # test defaults to the val split
    assert dm.dataset_name("test") != dm.dataset_name("val") and len(dm._datasets["test"]) == 2
    with pytest.raises(ValueError, match="no test data configured"):
        COCODataModule(train_json=str(train_json), train_images=str(tmp_path / "a" / "imgs")).setup("test")
    with pytest.raises(ValueError, match="val_images"):
        COCODataModule(val_json=str(val_json))


def test_demo_flag_uses_the_generated_demo_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_ensure(root):
        calls.append(Path(root))
        write_tiny_coco_layout(Path(root) / "coco")
        return Path(root)

    monkeypatch.setattr(coco_module, "ensure_demo_shapes", fake_ensure)
    dm = small_datamodule(tmp_path / "demo", demo=True)
    dm.prepare_data()
    dm.setup("fit")
    assert calls and calls[0] == tmp_path / "demo"
    assert dm.num_classes == 2 and len(dm._datasets["train"]) == 4


def test_bad_annotations_are_dropped_with_one_counted_warning(tmp_path):
    json_file = write_tiny_coco(tmp_path, "train2017", num_images=3, with_crowd=False)
    data = _json(json_file)
    good = len(data["annotations"])
    base = {"image_id": 15, "category_id": 3, "iscrowd": 0}
    empty_rle = mask_utils.encode(np.zeros((64, 64), dtype=np.uint8, order="F"))
    bad = [
        {"bbox": [5, 5, 0, 10], "segmentation": [[5, 5, 5, 15, 6, 15]]},          # w = 0
        {"bbox": [5, 5, 10, -2], "segmentation": [[5, 5, 15, 5, 15, 7]]},          # h < 0
        {"bbox": [70, 10, 10, 10], "segmentation": [[70, 10, 80, 10, 80, 20]]},    # box outside
        {"bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5]]},                 # 2-point polygon
        {"bbox": [5, 5, 10, 10], "segmentation": [[-20, -20, -10, -20, -10, -10]]},  # polygon outside
        {"bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 10, 10, 15, 15]]},        # collinear: empty mask
        {"bbox": [5, 5, 10, 10], "segmentation": {"size": [64, 64], "counts": empty_rle["counts"].decode()}},
    ]
    # a polygon part with < 3 points is dropped but its valid sibling keeps the annotation
    partly = {"bbox": [5, 5, 10, 10], "segmentation": [[5, 5, 15, 5], [5, 5, 15, 5, 15, 15, 5, 15]]}
    for offset, ann in enumerate(bad + [partly]):
        data["annotations"].append({**base, **ann, "id": 1000 + offset})
    json_file.write_text(json.dumps(data))

    with pytest.warns(DroppedAnnotationsWarning) as record:
        records, _ = load_coco_instances(json_file, tmp_path / "train2017")
    assert len(record) == 1
    message = str(record[0].message)
    assert f"dropped {len(bad)} of {good + len(bad) + 1} annotations" in message
    for reason in ("1 box outside the image", "2 degenerate box", "2 polygon with < 3 points",
                   "1 polygon outside the image", "2 empty mask"):
        assert reason in message, message
    kept = [a for r in records for a in r["annotations"]]
    assert len(kept) == good + 1
    assert [len(a["segmentation"]) for a in kept if a["bbox"] == [5.0, 5.0, 10.0, 10.0]] == [1]


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d["images"][1].pop("height"), r"images\[1\] \(id=15\)"),
        (lambda d: d["annotations"][0].pop("bbox"), r"annotations\[0\] \(id=1\)"),
        (lambda d: d["annotations"][0].update(category_id=99), r"annotations\[0\].*category_id 99"),
        (lambda d: d["annotations"][0].update(image_id=12345), r"annotations\[0\].*image_id 12345"),
        (lambda d: d["annotations"][0].update(segmentation="oops"), r"annotations\[0\]"),
        (lambda d: d.pop("categories"), "missing list 'categories'"),
    ],
)
def test_malformed_annotation_json_names_file_and_entry(tmp_path, mutate, match):
    json_file = write_tiny_coco(tmp_path, "train2017", num_images=3)
    data = _json(json_file)
    mutate(data)
    json_file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match) as error:
        load_coco_instances(json_file, tmp_path / "train2017")
    assert str(json_file) in str(error.value)


def test_unparsable_json_and_missing_image_file_raise_naming_the_file(tmp_path):
    json_file = write_tiny_coco(tmp_path, "train2017", num_images=3)
    (tmp_path / "train2017" / "000015.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"000015\.png.*images\[1\] \(id=15\)"):
        load_coco_instances(json_file, tmp_path / "train2017")
    json_file.write_text('{"images": [')
    with pytest.raises(ValueError, match=f"malformed COCO annotation json {json_file}"):
        load_coco_instances(json_file, tmp_path / "train2017")
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco_instances(tmp_path / "nope.json", tmp_path / "train2017")


def test_mapper_builds_instances_with_masks_and_leaves_crowd_out(tmp_path):
    json_file = write_tiny_coco(tmp_path, "train2017", num_images=3)
    records, _ = load_coco_instances(json_file, tmp_path / "train2017")
    crowd_record = next(r for r in records if any(a["iscrowd"] for a in r["annotations"]))
    mapper = COCOInstanceMapper(build_augmentations(True, "multiscale", [96], 200), is_train=True)
    out = mapper(crowd_record)
    assert out["image"].shape == (3, 96, 96) and out["image"].dtype == torch.uint8
    assert (out["height"], out["width"]) == (64, 64)
    instances = out["instances"]
    non_crowd = [a for a in crowd_record["annotations"] if not a["iscrowd"]]
    assert len(instances) == len(non_crowd) == 1
    assert isinstance(instances.gt_masks, PolygonMasks)
    mask = instances.gt_masks.crop_and_resize(instances.gt_boxes.tensor, 28)
    assert mask.float().mean() > 0.3  # the square fills its box
    # evaluation mapping: resized image, no instances, original size kept for rescaling outputs
    eval_out = COCOInstanceMapper(build_augmentations(False, test_min_size=32, test_max_size=64), is_train=False)(crowd_record)
    assert eval_out["image"].shape == (3, 32, 32) and "instances" not in eval_out
    # BGR order is the reverse of RGB
    bgr = COCOInstanceMapper(build_augmentations(False, test_min_size=64), is_train=False, image_format="BGR")(crowd_record)
    rgb = COCOInstanceMapper(build_augmentations(False, test_min_size=64), is_train=False)(crowd_record)
    assert torch.equal(bgr["image"], rgb["image"].flip(0))


def test_rle_instance_masks_and_detr_crop_augmentation(tmp_path):
    json_file = write_tiny_coco(tmp_path, "train2017", num_images=6, size=96)
    data = _json(json_file)
    for ann in data["annotations"]:  # store every non-crowd mask as uncompressed RLE
        if not ann["iscrowd"]:
            rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 96, 96))
            mask = mask_utils.decode(rle)
            flat = mask.flatten(order="F")
            changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]]))) if flat.any() else np.array([], int)
            runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
            ann["segmentation"] = {"size": [96, 96], "counts": runs}
    json_file.write_text(json.dumps(data))
    records, _ = load_coco_instances(json_file, tmp_path / "train2017")
    record = next(r for r in records if sum(not a["iscrowd"] for a in r["annotations"]) == 2)
    mapper = COCOInstanceMapper(build_augmentations(True, "multiscale", [96], 200), is_train=True)
    out = mapper(record)
    assert isinstance(out["instances"].gt_masks, BitMasks)
    # the decoded RLE masks are the polygons' masks (flip may mirror them)
    expected = [mask_utils.area(a["segmentation"]) for a in record["annotations"]]
    assert sorted(out["instances"].gt_masks.tensor.sum(dim=(1, 2)).tolist()) == sorted(int(v) for v in expected)

    np.random.seed(0)
    detr = COCOInstanceMapper(build_augmentations(True, "detr", [64, 80], 200, [48, 64], [32, 48]), is_train=True)
    shapes = set()
    for _ in range(12):
        out = detr(record)
        height, width = out["image"].shape[1:]
        shapes.add((height, width))
        boxes = out["instances"].gt_boxes.tensor
        assert ((boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all())
        assert out["instances"].gt_masks.tensor.shape[1:] == (height, width)
    assert len(shapes) > 1


def test_dataloaders_give_lists_of_variable_size_images(tmp_path):
    dm = small_datamodule(write_tiny_coco_layout(tmp_path), train_min_sizes=[48, 64], batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, list) and len(batch) == 2
    assert all({"image", "instances", "image_id", "height", "width"} <= set(item) for item in batch)
    val = list(dm.val_dataloader())
    assert sum(len(b) for b in val) == 3 and "instances" not in val[0][0]
    # predict on a folder of images (recursively), ids assigned in file order
    folder = tmp_path / "predict" / "nested"
    folder.mkdir(parents=True)
    Image.new("RGB", (40, 30)).save(folder / "a.jpg")
    Image.new("RGB", (30, 40)).save(tmp_path / "predict" / "b.png")
    dm_predict = small_datamodule(tmp_path, predict_images=str(tmp_path / "predict"))
    dm_predict.setup("predict")
    items = [item for b in dm_predict.predict_dataloader() for item in b]
    assert [(Path(i["file_name"]).name, i["image_id"], i["height"], i["width"]) for i in items] == [("b.png", 1, 40, 30), ("a.jpg", 2, 30, 40)]

"""COCO test-dev submissions: ``predict`` on an image folder whose ids come from an image-info json writes the
evaluation server's json + zip (COCOSubmissionWriter), which pycocotools' ``loadRes`` reads back."""
from __future__ import annotations

import contextlib
import io
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.data import Metadata
from detectron2.structures import Boxes, Instances
from PIL import Image
from pycocotools.coco import COCO
from test_coco_data import TINY_CATEGORIES, write_tiny_coco
from test_mask_rcnn import SMALL_IMAGES, _tiny_trainer, tiny_detectron2

from datamodules.coco import COCODataModule, load_image_info
from datamodules.image_io import DataNotFoundError
from focalnet_pl.tasks.detection import DetectionTask
from focalnet_pl.tasks.writers import COCOSubmissionWriter

pytestmark = pytest.mark.usefixtures("one_thread")  # many small ops

#: (image id, file name, height, width) of the generated "test-dev" images: ids unrelated to names or order
TEST_IMAGES = [(139, "COCO_test2017_b.jpg", 48, 64), (285, "COCO_test2017_a.jpg", 64, 40), (632, "c.png", 56, 56)]


def _image_info(folder: Path) -> Path:
    """A test-dev style folder (one more image than listed, as test2017 holds test-dev and test-challenge)
    and its ``image_info_test-dev2017.json`` (images and categories, no annotations)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _, name, height, width in TEST_IMAGES + [(0, "not_in_test_dev.jpg", 32, 32)]:
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / name)
    info = folder.parent / "image_info_test-dev2017.json"
    info.write_text(json.dumps({
        "info": {"description": "generated"},
        "images": [{"id": i, "file_name": n, "height": h, "width": w} for i, n, h, w in TEST_IMAGES],
        "categories": TINY_CATEGORIES,
    }))
    return info


def test_predict_writes_a_test_dev_submission_that_pycocotools_reads(tmp_path: Path) -> None:
    # a model trained (one step) on data whose category ids are 3 and 7: the checkpoint keeps them
    train_json = write_tiny_coco(tmp_path / "train", "train2017", num_images=3, size=64, with_crowd=False)
    train = COCODataModule(train_json=str(train_json), train_images=str(tmp_path / "train" / "train2017"), **SMALL_IMAGES)
    task = DetectionTask(detectron2=tiny_detectron2(), lr=1e-3)
    trainer = _tiny_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(task, train)
    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)

    info = _image_info(tmp_path / "test2017")
    data = COCODataModule(predict_images=str(tmp_path / "test2017"), predict_image_info=str(info), **SMALL_IMAGES)
    out = tmp_path / "predictions"
    predictor = DetectionTask(detectron2=tiny_detectron2(), predict_output_dir=str(out))
    writer = COCOSubmissionWriter(name="focalnet-tiny")
    _tiny_trainer(tmp_path, callbacks=[writer]).predict(predictor, data, ckpt_path=ckpt, return_predictions=False)

    with zipfile.ZipFile(out / "detections_test-dev2017_focalnet-tiny_results.zip") as archive:
        assert archive.namelist() == ["detections_test-dev2017_focalnet-tiny_results.json"]
        results = json.loads(archive.read("detections_test-dev2017_focalnet-tiny_results.json"))
    assert results == json.loads((out / "detections_test-dev2017_focalnet-tiny_results.json").read_text())
    # the task's own outputs are unchanged: drawn images and coco_results.json hold the same detections
    assert sorted(p.name for p in out.glob("*.png")) == ["COCO_test2017_a.png", "COCO_test2017_b.png", "c.png"]
    assert sorted(results, key=json.dumps) == sorted(json.loads((out / "coco_results.json").read_text()), key=json.dumps)

    with contextlib.redirect_stdout(io.StringIO()):
        detections = COCO(str(info)).loadRes(results)
    sizes = {i: (h, w) for i, _, h, w in TEST_IMAGES}
    assert results and set(detections.getImgIds()) == set(sizes)
    assert {a["image_id"] for a in detections.loadAnns(detections.getAnnIds())} == set(sizes)  # every image, only them
    for ann in detections.loadAnns(detections.getAnnIds()):
        height, width = sizes[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert ann["category_id"] in {3, 7} and 0 <= ann["score"] <= 1
        assert w > 0 and h > 0 and x >= -1e-3 and y >= -1e-3 and x + w <= width + 1e-3 and y + h <= height + 1e-3
        assert ann["segmentation"]["size"] == [height, width] and isinstance(ann["segmentation"]["counts"], str)


def test_submission_checks_ids_and_categories(tmp_path: Path) -> None:
    info = _image_info(tmp_path / "test2017")
    records, categories = load_image_info(info, tmp_path / "test2017")
    assert [(r["image_id"], Path(r["file_name"]).name) for r in records] == [(i, n) for i, n, _, _ in TEST_IMAGES]
    assert categories == TINY_CATEGORIES
    (tmp_path / "test2017" / "c.png").unlink()
    with pytest.raises(DataNotFoundError, match=r"c\.png of .*image_info_test-dev2017\.json: images\[2\] \(id=632\)"):
        load_image_info(info, tmp_path / "test2017")

    writer = COCOSubmissionWriter(name="x")
    trainer = SimpleNamespace(is_global_zero=True, default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(predict_split_name="test-dev2017", predict_categories=categories))
    task = SimpleNamespace(hparams={}, class_metadata=Metadata(thing_dataset_id_to_contiguous_id={1: 0}))
    instances = Instances((8, 8), pred_boxes=Boxes(torch.tensor([[0.0, 0.0, 2.0, 2.0]])), scores=torch.tensor([0.5]),
                          pred_classes=torch.tensor([0]))
    writer.write_on_batch_end(trainer, task, [{"image": {"id": 139}, "instances": instances}], None, None, 0)
    with pytest.raises(ValueError, match=r"predicted category ids \[1\] are not among the categories"):
        writer.on_predict_epoch_end(trainer, task)
    trainer.datamodule.predict_split_name = None  # a folder without image-info json: running numbers, not COCO ids
    with pytest.warns(UserWarning, match="no submission written: the predict images carry no COCO image ids"):
        writer.on_predict_epoch_end(trainer, task)
    assert not list(tmp_path.glob("detections_*"))
    assert COCODataModule(predict_images=str(tmp_path / "test2017")).predict_split_name is None
    with pytest.raises(ValueError, match="predict_image_info needs predict_images"):
        COCODataModule(root=str(tmp_path), predict_image_info=str(info))

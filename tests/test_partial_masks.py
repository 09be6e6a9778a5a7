"""Mixed box-only and mask annotations: the mask head learns from annotated masks only, and mask AP
treats box-only objects as ignore regions (the end-to-end run is in the bad-input catalogue)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from pycocotools import mask as mask_utils

from datamodules.coco import COCOInstanceMapper, build_augmentations
from focalnet_pl.evaluation.coco import box_only_as_ignore_regions, coco_metrics
from focalnet_pl.d2.partial_masks import HAS_MASK_FIELD
from focalnet_pl.tasks.detection import DetectionTask
from helpers import deep_update, tiny_detectron2


def _proposals(count: int, generator: torch.Generator, has_mask: list[bool] | None) -> Instances:
    instances = Instances((32, 32))
    corners = torch.rand(count, 2, generator=generator) * 16
    instances.proposal_boxes = Boxes(torch.cat([corners, corners + 8 + 8 * torch.rand(count, 2, generator=generator)], 1))
    instances.gt_classes = torch.randint(0, 2, (count,), generator=generator)
    instances.gt_masks = BitMasks(torch.rand(count, 32, 32, generator=generator) > 0.5)
    if has_mask is not None:
        instances.set(HAS_MASK_FIELD, torch.tensor(has_mask))
    return instances


def test_mask_head_loss_leaves_out_box_only_objects() -> None:
    task = DetectionTask(detectron2=deep_update(tiny_detectron2(), {"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}}))
    head = task.model.roi_heads.mask_head.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in head.parameters():  # trained-like weights
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    features = torch.randn(5, 32, 14, 14, generator=generator)
    mixed, full = _proposals(3, generator, [True, False, True]), _proposals(2, generator, None)
    with EventStorage(0), torch.no_grad():
        loss = head(features, [mixed, full])["loss_mask"]
        keep = torch.tensor([True, False, True, True, True])
        annotated = Instances((32, 32), **{k: v for k, v in mixed[mixed.get(HAS_MASK_FIELD)].get_fields().items()
                                           if k != HAS_MASK_FIELD})
        expected = head(features[keep], [annotated, full])["loss_mask"]
        unfiltered = head(features, [Instances((32, 32), **{k: v for k, v in mixed.get_fields().items() if k != HAS_MASK_FIELD}), full])
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    assert not torch.allclose(loss, unfiltered["loss_mask"])  # the box-only object's (empty) mask is not learnt


def test_mapper_flags_the_objects_without_masks() -> None:
    image = np.zeros((32, 40, 3), np.uint8)
    record = {"file_name": "x.png", "image_id": 1, "height": 32, "width": 40, "annotations": [
        {"bbox": [2, 2, 10, 10], "bbox_mode": 1, "category_id": 0, "iscrowd": 0},
        {"bbox": [20, 4, 10, 12], "bbox_mode": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": [[20, 4, 30, 4, 30, 16, 20, 16]]},
    ]}
    mapper = COCOInstanceMapper(build_augmentations(False), is_train=True)
    mapper._read = lambda record: image  # noqa: SLF001 - no file needed
    instances = mapper(record)["instances"]
    assert instances.get(HAS_MASK_FIELD).tolist() == [False, True]
    masks = instances.gt_masks.crop_and_resize(instances.gt_boxes.tensor, 8)
    assert not masks[0].any() and masks[1].all()
    all_masks = COCOInstanceMapper(build_augmentations(False), is_train=True)
    all_masks._read = mapper._read  # noqa: SLF001
    assert not all_masks({**record, "annotations": record["annotations"][1:]})["instances"].has(HAS_MASK_FIELD)


def test_mask_ap_ignores_box_only_ground_truth() -> None:
    from pycocotools.coco import COCO

    square = np.zeros((40, 40), np.uint8)
    square[4:14, 4:14] = 1
    gt = COCO()
    gt.dataset = {
        "images": [{"id": 1, "height": 40, "width": 40}],
        "categories": [{"id": 5, "name": "thing"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [4, 4, 10, 10], "area": 100, "iscrowd": 0,
             "segmentation": [[4, 4, 14, 4, 14, 14, 4, 14]]},
            {"id": 2, "image_id": 1, "category_id": 5, "bbox": [20, 20, 12, 12], "area": 144, "iscrowd": 0},
        ],
    }
    gt.createIndex()
    on_box_only = np.zeros((40, 40), np.uint8)
    on_box_only[22:30, 22:30] = 1
    results = []
    for mask, score in ((square, 0.8), (on_box_only, 0.9)):
        rle = mask_utils.encode(np.asfortranarray(mask))
        results.append({"image_id": 1, "category_id": 5, "score": score,
                        "segmentation": {"size": [40, 40], "counts": rle["counts"].decode("ascii")}})
    masks_gt = box_only_as_ignore_regions(gt)
    assert masks_gt.anns[2]["iscrowd"] == 1 and gt.anns[2].get("segmentation") is None  # the original is untouched
    # the higher-scored detection on the box-only object is neither a match nor a false positive
    assert coco_metrics(masks_gt, results, "segm")["AP"] == pytest.approx(1.0)
    assert box_only_as_ignore_regions(masks_gt) is masks_gt

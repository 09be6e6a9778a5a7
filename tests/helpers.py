"""Builders shared by the test modules: tiny models and configs, small datasets written to disk."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

from datamodules.segmentation import IGNORE_LABEL
from focalnet_pl.d2 import build_detectron2_cfg
from focalnet_pl.d2.mmdet_weights import COCO_THING_NAMES
from focalnet_pl.focalnet import create_focalnet


TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "drop_path_rate": 0.0}


def write_imagefolder(root: Path, n_per_class: int = 12, size: int = 32, val_per_class: int | None = None,
                      levels: tuple[float, float] = (40, 210), noise: float = 20) -> Path:
    """Two classes, dark and bright noisy squares (mean ``levels``, standard deviation ``noise``), in the
    ImageFolder layout: ``n_per_class`` training images (and ``val_per_class``, default the same, for val)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n_per_class), ("val", n_per_class if val_per_class is None else val_per_class)):
        for cls, level in zip(("dark", "bright"), levels):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image = np.clip(rng.normal(level, noise, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


#: Non-contiguous dataset ids, as in COCO.
TINY_CATEGORIES = [{"id": 3, "name": "square"}, {"id": 7, "name": "triangle"}]


def _shape_polygon(category_id: int, x: float, y: float, size: float) -> list[float]:
    if category_id == 3:
        return [x, y, x + size, y, x + size, y + size, x, y + size]
    return [x + size / 2, y, x + size, y + size, x, y + size]


def write_tiny_coco(root: Path, split: str = "train2017", num_images: int = 4, size: int = 64, seed: int = 0,
                    with_crowd: bool = True) -> Path:
    """Standard-layout COCO split under ``root``: image ``k`` has ``k % 3`` shapes (image 0 none)."""
    rng = np.random.default_rng(seed)
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        image_id = 10 + index * 5
        canvas = Image.new("RGB", (size, size), (30, 30, 30))
        draw = ImageDraw.Draw(canvas)
        for k in range(index % 3):
            category_id = TINY_CATEGORIES[(index + k) % 2]["id"]
            side = float(rng.integers(size // 4, size // 2))
            x = float(rng.integers(0, size // 2 - 2)) if k == 0 else float(size // 2)
            y = float(rng.integers(0, size - side))
            polygon = _shape_polygon(category_id, x, y, side)
            draw.polygon(polygon, fill=(230, 60, 60) if category_id == 3 else (60, 200, 90))
            rle = mask_utils.merge(mask_utils.frPyObjects([polygon], size, size))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category_id,
                "segmentation": [polygon], "area": float(mask_utils.area(rle)),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0,
            })
        if with_crowd and index == 1:
            crowd = np.zeros((size, size), dtype=np.uint8)
            crowd[size - 10:, size - 10:] = 1
            rle = mask_utils.encode(np.asfortranarray(crowd))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 3,
                "segmentation": {"size": [size, size], "counts": rle["counts"].decode("ascii")},
                "area": float(crowd.sum()), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 1,
            })
        file_name = f"{image_id:06d}.png"
        canvas.save(image_dir / file_name)
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    json_file = root / "annotations" / f"instances_{split}.json"
    json_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": TINY_CATEGORIES}))
    return json_file


def write_tiny_coco_layout(root: Path, num_train: int = 4, num_val: int = 3, size: int = 64) -> Path:
    write_tiny_coco(root, "train2017", num_train, size, seed=0)
    write_tiny_coco(root, "val2017", num_val, size, seed=1)
    return root


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


#: Small-model overrides: narrow widths, one block per stage, few proposals.
TINY_MODEL = {
    "MODEL": {
        # tiny widths: no pretrained backbone (the demo config names the classification demo's export)
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0, "WEIGHTS": ""},
        "FPN": {"OUT_CHANNELS": 32},
        "ANCHOR_GENERATOR": {"SIZES": [[16], [32], [64], [128], [256]]},
        "RPN": {"BATCH_SIZE_PER_IMAGE": 64, "PRE_NMS_TOPK_TRAIN": 200, "PRE_NMS_TOPK_TEST": 100,
                "POST_NMS_TOPK_TRAIN": 100, "POST_NMS_TOPK_TEST": 50},
        "ROI_HEADS": {"BATCH_SIZE_PER_IMAGE": 64},
        "ROI_BOX_HEAD": {"FC_DIM": 64},
        "ROI_MASK_HEAD": {"NUM_CONV": 1, "CONV_DIM": 16},
    },
    "TEST": {"DETECTIONS_PER_IMAGE": 10},
}


SMALL_IMAGES = {"train_min_sizes": [64], "train_max_size": 96, "crop_resize_sizes": [48, 64], "crop_size": [32, 48],
                "test_min_size": 64, "test_max_size": 96, "batch_size": 2, "eval_batch_size": 2, "num_workers": 0}


def deep_update(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def tiny_detectron2(mask_on: bool = True) -> dict:
    """A complete small Mask R-CNN config (the recipe of the YAML files with TINY_MODEL applied)."""
    recipe = yaml.safe_load((CONFIGS / "mask_rcnn_focalnet_t_srf_1x.yaml").read_text())
    detectron2 = deep_update(recipe["model"]["init_args"]["detectron2"], TINY_MODEL)
    detectron2["MODEL"]["MASK_ON"] = mask_on
    return detectron2


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    options = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp_path))
    options.update(kwargs)
    return L.Trainer(**options)


WIDTH, FPN, FC, MASK = 16, 32, 64, 16  # backbone embed dim, FPN channels, box FC dim, mask conv dim


RATIOS = (0.5, 1.0, 2.0)


def mask_rcnn_config(num_classes: int = 80, **model_overrides) -> dict:
    """A small Mask R-CNN with the released heads' structure (4-conv mask head) and anchors."""
    model = {
        "META_ARCHITECTURE": "GeneralizedRCNN", "MASK_ON": True, "DEVICE": "cpu",
        "PIXEL_MEAN": [123.675, 116.28, 103.53], "PIXEL_STD": [58.395, 57.12, 57.375],
        "BACKBONE": {"NAME": "build_focalnet_fpn_backbone"},
        "FOCALNET": {"EMBED_DIM": WIDTH, "DEPTHS": [1, 1, 1, 1], "FOCAL_WINDOWS": [9, 9, 9, 9], "DROP_PATH_RATE": 0.0},
        "FPN": {"IN_FEATURES": ["res2", "res3", "res4", "res5"], "OUT_CHANNELS": FPN},
        "ANCHOR_GENERATOR": {"SIZES": [[32], [64], [128], [256], [512]], "ASPECT_RATIOS": [[0.5, 1.0, 2.0]]},
        "RPN": {"IN_FEATURES": ["p2", "p3", "p4", "p5", "p6"], "PRE_NMS_TOPK_TEST": 300, "POST_NMS_TOPK_TEST": 200},
        "ROI_HEADS": {"NAME": "StandardROIHeads", "IN_FEATURES": ["p2", "p3", "p4", "p5"], "NUM_CLASSES": num_classes,
                      "SCORE_THRESH_TEST": 0.005, "NMS_THRESH_TEST": 0.5},
        "ROI_BOX_HEAD": {"NAME": "FastRCNNConvFCHead", "NUM_FC": 2, "FC_DIM": FC, "POOLER_RESOLUTION": 7},
        "ROI_MASK_HEAD": {"NAME": "MaskRCNNConvUpsampleHead", "NUM_CONV": 4, "CONV_DIM": MASK, "POOLER_RESOLUTION": 14},
    }
    for key, value in model_overrides.items():
        model[key] = {**model[key], **value} if isinstance(value, dict) else value
    return {"MODEL": model, "TEST": {"DETECTIONS_PER_IMAGE": 30}}


def mask_rcnn(num_classes: int = 80, **model_overrides) -> torch.nn.Module:
    return build_model(build_detectron2_cfg(mask_rcnn_config(num_classes, **model_overrides))).eval()


def _param(generator: torch.Generator, *shape: int, scale: float | None = None) -> torch.Tensor:
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    std = scale if scale is not None else 1.0 / math.sqrt(fan_in)
    return torch.randn(*shape, generator=generator) * std


def mmdet_checkpoint(seed: int = 0, width: int = WIDTH, num_classes: int = 80, mask: bool = True) -> dict:
    """A trained-like Mask R-CNN checkpoint in the layout of microsoft/FocalNet's detection release."""
    generator = torch.Generator().manual_seed(seed)
    backbone = create_focalnet("focalnet_tiny_srf", features_only=True, embed_dim=width, depths=(1, 1, 1, 1),
                               focal_windows=(9, 9, 9, 9))
    state = {f"backbone.{k}": v + 0.02 * torch.randn(v.shape, generator=generator) for k, v in backbone.state_dict().items()}
    for i, channels in enumerate(width * 2**i for i in range(4)):
        state[f"neck.lateral_convs.{i}.conv.weight"] = _param(generator, FPN, channels, 1, 1)
        state[f"neck.fpn_convs.{i}.conv.weight"] = _param(generator, FPN, FPN, 3, 3)
        state[f"neck.lateral_convs.{i}.conv.bias"] = _param(generator, FPN, scale=0.1)
        state[f"neck.fpn_convs.{i}.conv.bias"] = _param(generator, FPN, scale=0.1)
    anchors = len(RATIOS)
    for name, rows, scale in (("rpn_conv", FPN, None), ("rpn_cls", anchors, None), ("rpn_reg", 4 * anchors, 0.05)):
        state[f"rpn_head.{name}.weight"] = _param(generator, rows, FPN, *((3, 3) if name == "rpn_conv" else (1, 1)),
                                                  scale=scale)
        state[f"rpn_head.{name}.bias"] = _param(generator, rows, scale=0.1)
    state["roi_head.bbox_head.shared_fcs.0.weight"] = _param(generator, FC, FPN * 49)
    state["roi_head.bbox_head.shared_fcs.1.weight"] = _param(generator, FC, FC)
    state["roi_head.bbox_head.fc_cls.weight"] = _param(generator, num_classes + 1, FC, scale=0.5)
    state["roi_head.bbox_head.fc_reg.weight"] = _param(generator, 4 * num_classes, FC, scale=0.1)
    for name, rows in (("shared_fcs.0", FC), ("shared_fcs.1", FC), ("fc_cls", num_classes + 1), ("fc_reg", 4 * num_classes)):
        state[f"roi_head.bbox_head.{name}.bias"] = _param(generator, rows, scale=0.1)
    if mask:
        for i in range(4):
            state[f"roi_head.mask_head.convs.{i}.conv.weight"] = _param(generator, MASK, FPN if i == 0 else MASK, 3, 3)
            state[f"roi_head.mask_head.convs.{i}.conv.bias"] = _param(generator, MASK, scale=0.1)
        state["roi_head.mask_head.upsample.weight"] = _param(generator, MASK, MASK, 2, 2)
        state["roi_head.mask_head.upsample.bias"] = _param(generator, MASK, scale=0.1)
        state["roi_head.mask_head.conv_logits.weight"] = _param(generator, num_classes, MASK, 1, 1)
        state["roi_head.mask_head.conv_logits.bias"] = _param(generator, num_classes, scale=0.1)
    meta = {"mmdet_version": "2.11.0", "epoch": 12, "CLASSES": COCO_THING_NAMES[:num_classes]}
    return {"meta": meta, "state_dict": state}


def write_ade(root: Path, size: tuple[int, int] = (48, 64), label_size: tuple[int, int] | None = None) -> Path:
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


def write_panoptic(root: Path, extra_png_id: int | None = None,
                   shapes: Sequence[tuple[int, int]] = ((40, 40), (40, 40))) -> tuple[Path, Path, Path]:
    """Images of ``shapes`` (default two 40x40; each side >= 40): stuff "sky" (id 50) on the top 20 rows, a
    thing "box" (id 7) and a crowd box (id 8) below."""
    images, pngs = root / "images", root / "panoptic"
    images.mkdir(parents=True)
    pngs.mkdir()
    annotations = []
    image_ids = list(range(1, len(shapes) + 1))
    for image_id, (height, width) in zip(image_ids, shapes):
        ids = np.zeros((height, width), np.int64)
        ids[:20] = 50
        ids[25:35, 5:15] = 7
        ids[25:35, 25:35] = 8
        if extra_png_id is not None:
            ids[0, 0] = extra_png_id
        rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)
        Image.fromarray(np.full((height, width, 3), 100, np.uint8)).save(images / f"{image_id}.jpg")
        Image.fromarray(rgb).save(pngs / f"{image_id}.png")
        annotations.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": [
            {"id": 50, "category_id": 30, "iscrowd": 0},
            {"id": 7, "category_id": 4, "iscrowd": 0},
            {"id": 8, "category_id": 4, "iscrowd": 1},
        ]})
    json_file = root / "panoptic.json"
    json_file.write_text(json.dumps({
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in zip(image_ids, shapes)],
        "annotations": annotations,
        "categories": [{"id": 4, "name": "box", "isthing": 1}, {"id": 30, "name": "sky", "isthing": 0}],
    }))
    return json_file, images, pngs


def write_ade_semantic(base: Path, folder: str, label_format: str) -> None:
    """Semantic PNGs for the two 40x40 panoptic images under ``base``: class 1 ("sky") on the top 10 rows,
    class 0 below, unlabelled on row 39 (``annotations_detectron2`` or raw ``annotations`` format)."""
    target = base / ("annotations_detectron2" if label_format == "detectron2" else "annotations") / folder
    target.mkdir(parents=True)
    label = np.zeros((40, 40), np.uint8)
    label[:10] = 1
    label[39] = IGNORE_LABEL
    stored = label if label_format == "detectron2" else (label + 1).astype(np.uint8)  # 255 + 1 -> 0
    for image_id in (1, 2):
        Image.fromarray(stored).save(target / f"{image_id}.png")


def random_boxes(count: int, gen: torch.Generator) -> torch.Tensor:
    centres = torch.rand(count, 2, generator=gen) * 0.6 + 0.2
    sizes = torch.rand(count, 2, generator=gen) * 0.3 + 0.05
    return torch.cat([centres, sizes], -1)


def tiny_dino_cfg(**dino_overrides):
    dino = {
        "NUM_CLASSES": 2, "HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2, "DIM_FEEDFORWARD": 64,
        "NUM_QUERIES": 20, "DN_NUMBER": 10, "NUM_FEATURE_LEVELS": 3, "IN_FEATURES": ["res3", "res4", "res5"],
        "NUM_SELECT": 10,
    }
    dino.update(dino_overrides)
    return build_detectron2_cfg({"MODEL": {
        "META_ARCHITECTURE": "DINO", "DEVICE": "cpu", "BACKBONE": {"NAME": "build_focalnet_backbone"},
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
        "DINO": dino,
    }})


def scene(boxes: list[tuple[int, int, int, int]], classes: list[int], size: int = 64) -> dict:
    """A flat background with solid rectangles, one colour per class."""
    image = torch.full((3, size, size), 40.0)
    colours = [torch.tensor([255.0, 60.0, 60.0]), torch.tensor([60.0, 60.0, 255.0])]
    for (x0, y0, x1, y1), label in zip(boxes, classes):
        image[:, y0:y1, x0:x1] = colours[label][:, None, None]
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    instances.gt_classes = torch.tensor(classes, dtype=torch.long)
    return {"image": image, "instances": instances, "height": size, "width": size}


def tiny_mask2former(num_classes: int, thing_ids: list[int], panoptic: bool = True) -> dict:
    return {
        "MODEL": {
            "META_ARCHITECTURE": "Mask2Former",
            "DEVICE": "cpu",
            "PIXEL_MEAN": [123.675, 116.28, 103.53],
            "PIXEL_STD": [58.395, 57.12, 57.375],
            "BACKBONE": {"NAME": "build_focalnet_backbone"},
            "FOCALNET": {"VARIANT": "focalnet_tiny_srf", "EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
            "SEM_SEG_HEAD": {"NUM_CLASSES": num_classes, "IN_FEATURES": ["res2", "res3", "res4", "res5"],
                             "CONVS_DIM": 32, "MASK_DIM": 32, "TRANSFORMER_ENC_LAYERS": 1,
                             "DEFORMABLE_NUM_HEADS": 4, "DEFORMABLE_DIM_FEEDFORWARD": 64},
            "MASK_FORMER": {"HIDDEN_DIM": 32, "NHEADS": 4, "DIM_FEEDFORWARD": 64, "NUM_OBJECT_QUERIES": 8,
                            "DEC_LAYERS": 3, "TRAIN_NUM_POINTS": 256, "THING_CLASS_IDS": thing_ids,
                            "TEST": {"PANOPTIC_ON": panoptic, "INSTANCE_ON": panoptic, "OBJECT_MASK_THRESHOLD": 0.5}},
        }
    }


# ---- a whole tiny model -----------------------------------------------------------------------------
def scene_batch() -> list[dict]:
    """Two 64x64 images: a bright square (thing 0) on dark ground (stuff 1), sky band (stuff 2) on top."""
    batch = []
    for top, left in ((28, 8), (36, 30)):
        image = torch.zeros(3, 64, 64)
        image[:, :16] = torch.tensor([90.0, 160.0, 230.0])[:, None, None]  # sky
        image[:, 16:] = torch.tensor([60.0, 50.0, 30.0])[:, None, None]  # ground
        image[:, top : top + 20, left : left + 20] = torch.tensor([230.0, 30.0, 30.0])[:, None, None]
        thing = torch.zeros(64, 64, dtype=torch.bool)
        thing[top : top + 20, left : left + 20] = True
        sky = torch.zeros(64, 64, dtype=torch.bool)
        sky[:16] = True
        ground = ~thing & ~sky
        instances = Instances((64, 64))
        instances.gt_classes = torch.tensor([0, 1, 2])
        instances.gt_masks = torch.stack([thing, ground, sky])
        ids = thing.long() * 1 + ground.long() * 2 + sky.long() * 3
        segments = [{"id": 1, "category_id": 0, "iscrowd": 0}, {"id": 2, "category_id": 1, "iscrowd": 0},
                    {"id": 3, "category_id": 2, "iscrowd": 0}]
        batch.append({"image": image, "instances": instances, "height": 64, "width": 64, "image_id": len(batch),
                      "pan_seg_gt": ids, "segments_info": segments})
    return batch


def save_task_checkpoint(task: L.LightningModule, path: Path, call_hook: bool = False) -> Path:
    """``task`` saved at ``path`` as a Lightning checkpoint (weights, hyper-parameters, version; with
    ``call_hook`` what the task's ``on_save_checkpoint`` adds too), without a trainer."""
    checkpoint = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams),
                  "pytorch-lightning_version": L.__version__}
    if call_hook:
        task.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path

"""COCO instances (boxes + masks) for detectron2 models: loading, cleaning, catalog registration,
detectron2-style augmentation and list-of-dicts batches.

Datasets are registered in detectron2's ``DatasetCatalog`` / ``MetadataCatalog`` under a name
unique to their json + image folder, with the usual metadata (``thing_classes``,
``thing_dataset_id_to_contiguous_id``, ``json_file``, ``image_root``, ``evaluator_type="coco"``).
Records are detectron2's standard dataset dicts, so any detectron2 model or mapper can use them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from detectron2.data import DatasetCatalog, Metadata, MetadataCatalog
from detectron2.data import detection_utils as d2_utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset

from datamodules.demo_shapes import ensure_demo_shapes
from datamodules.image_io import DataNotFoundError, missing_data_message, predict_image_files, read_image_rgb
from datamodules.loading import GuardedLoader, ResumableDataModule

__all__ = [
    "COCODataModule",
    "BoxOnlyAnnotationsWarning",
    "COCOInstanceMapper",
    "DroppedAnnotationsWarning",
    "ListOfDictsDataModule",
    "MappedDataset",
    "RandomChoice",
    "build_augmentations",
    "load_coco_instances",
    "load_image_info",
    "register_coco_instances",
]

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]
Augmentation = Literal["multiscale", "detr", "none"]
#: the folder tree of ``COCODataModule(root=...)`` (named in its missing-data errors)
COCO_LAYOUT = (
    "  <root>/annotations/instances_train2017.json, instances_val2017.json\n"
    "  <root>/train2017/<image files>\n"
    "  <root>/val2017/<image files>"
)


class DroppedAnnotationsWarning(UserWarning):
    """Some annotations of a json were unusable and were dropped (one warning per file, with counts)."""


class BoxOnlyAnnotationsWarning(UserWarning):
    """Some annotations of a json have a box but no mask while others have one (one warning per file)."""


# --------------------------------------------------------------------------------------------
# loading and cleaning
# --------------------------------------------------------------------------------------------
def _entry(json_file: Path, section: str, index: int, item: Any) -> str:
    item_id = item.get("id") if isinstance(item, dict) else None
    return f"{json_file}: {section}[{index}]" + (f" (id={item_id})" if item_id is not None else "")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _read_json(json_file: Path, sections: tuple[str, ...] = ("images", "annotations", "categories"),
               kind: str = "COCO annotation") -> dict:
    """The json's data, checked to hold the list ``sections`` (a non-empty ``categories`` when listed)."""
    if not json_file.is_file():
        raise DataNotFoundError(f"{kind} file not found: {json_file}")
    try:
        with open(json_file) as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed {kind} json {json_file}: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"malformed {kind} json {json_file}: top level must be an object")
    for section in sections:
        if not isinstance(data.get(section), list):
            raise ValueError(f"malformed {kind} json {json_file}: missing list {section!r}")
    if "categories" in sections and not data["categories"]:
        raise ValueError(f"malformed {kind} json {json_file}: 'categories' is empty")
    return data


def _parse_categories(json_file: Path, categories: list) -> list[dict]:
    seen: set[int] = set()
    for index, category in enumerate(categories):
        if not isinstance(category, dict) or not isinstance(category.get("id"), int) or not isinstance(category.get("name"), str):
            raise ValueError(f"malformed category {_entry(json_file, 'categories', index, category)}: needs int 'id' and str 'name'")
        if category["id"] in seen:
            raise ValueError(f"duplicate category id {category['id']} in {_entry(json_file, 'categories', index, category)}")
        seen.add(category["id"])
    return sorted(categories, key=lambda c: c["id"])


def _parse_images(json_file: Path, images: list, image_root: Path) -> dict[int, dict]:
    present = set(os.listdir(image_root)) if image_root.is_dir() else set()
    parsed: dict[int, dict] = {}
    for index, image in enumerate(images):
        where = _entry(json_file, "images", index, image)
        if not isinstance(image, dict):
            raise ValueError(f"malformed image entry {where}: not an object")
        missing = [k for k in ("id", "file_name", "height", "width") if k not in image]
        if missing or not isinstance(image["id"], int) or not isinstance(image["file_name"], str):
            raise ValueError(f"malformed image entry {where}: needs int 'id', str 'file_name', 'height', 'width' (missing {missing})")
        if not (isinstance(image["height"], int) and isinstance(image["width"], int) and image["height"] > 0 and image["width"] > 0):
            raise ValueError(f"malformed image entry {where}: height/width must be positive ints, got {image['height']}x{image['width']}")
        if image["id"] in parsed:
            raise ValueError(f"duplicate image id {image['id']} in {where}")
        name = image["file_name"]
        if name not in present and not (image_root / name).is_file():
            raise DataNotFoundError(f"image file {image_root / name} of {where} does not exist")
        parsed[image["id"]] = image
    return parsed


def _polygon_area(coords: np.ndarray) -> float:
    x, y = coords[0::2], coords[1::2]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def _clean_segmentation(segm: Any, height: int, width: int, where: str, drops: Counter) -> list | dict | None:
    """Valid polygons of ``segm`` (or its compressed RLE); ``None`` when nothing usable remains."""
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            raise ValueError(f"malformed RLE segmentation in {where}: needs 'counts' and 'size'")
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"RLE size {segm['size']} of {where} differs from its image size {[height, width]}")
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
        if mask_utils.area(rle) == 0:
            drops["empty mask"] += 1
            return None
        return rle
    if not isinstance(segm, list):
        raise ValueError(f"malformed segmentation in {where}: expected polygons (list) or RLE (dict)")
    polygons = []
    for polygon in segm:
        if not isinstance(polygon, list) or not all(_is_number(v) for v in polygon):
            raise ValueError(f"malformed polygon in {where}: expected a flat list of numbers")
        if len(polygon) < 6 or len(polygon) % 2:
            drops["polygon with < 3 points"] += 1
            continue
        coords = np.asarray(polygon, dtype=np.float64)
        xs, ys = coords[0::2], coords[1::2]
        if xs.max() <= 0 or ys.max() <= 0 or xs.min() >= width or ys.min() >= height:
            drops["polygon outside the image"] += 1
            continue
        if _polygon_area(coords) <= 0:
            drops["empty mask"] += 1
            continue
        polygons.append(polygon)
    return polygons or None


def load_coco_instances(json_file: str | Path, image_root: str | Path) -> tuple[list[dict], list[dict]]:
    """detectron2 dataset dicts and the sorted categories of a COCO instances json.

    Category ids become contiguous indices (sorted by id). Images without annotations are kept
    (negatives). Annotations with a degenerate box (w or h <= 0, or no overlap with the image) or
    with no usable mask (polygons with < 3 points or outside the image, empty masks) are dropped,
    with one :class:`DroppedAnnotationsWarning` counting them by reason. Structural problems and
    missing image files raise, naming the file and the entry.
    """
    json_file, image_root = Path(json_file), Path(image_root)
    data = _read_json(json_file)
    categories = _parse_categories(json_file, data["categories"])
    to_contiguous = {c["id"]: i for i, c in enumerate(categories)}
    images = _parse_images(json_file, data["images"], image_root)

    per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    drops: Counter = Counter()
    for index, ann in enumerate(data["annotations"]):
        where = _entry(json_file, "annotations", index, ann)
        if not isinstance(ann, dict):
            raise ValueError(f"malformed annotation {where}: not an object")
        image = images.get(ann.get("image_id"))
        if image is None:
            raise ValueError(f"annotation {where} refers to unknown image_id {ann.get('image_id')!r}")
        if ann.get("category_id") not in to_contiguous:
            raise ValueError(f"annotation {where} has unknown category_id {ann.get('category_id')!r}")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise ValueError(f"malformed bbox {bbox!r} in annotation {where}: expected [x, y, w, h]")
        x, y, w, h = bbox
        height, width = image["height"], image["width"]
        if w <= 0 or h <= 0:
            drops["degenerate box (w or h <= 0)"] += 1
            continue
        if x >= width or y >= height or x + w <= 0 or y + h <= 0:
            drops["box outside the image"] += 1
            continue
        record = {
            "bbox": [float(v) for v in bbox],
            "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": to_contiguous[ann["category_id"]],
            "iscrowd": int(ann.get("iscrowd", 0)),
        }
        if ann.get("segmentation"):
            segm = _clean_segmentation(ann["segmentation"], height, width, where, drops)
            if segm is None:
                drops["annotations left without a mask"] += 1
                continue
            record["segmentation"] = segm
        per_image[image["id"]].append(record)

    box_only = [ann.get("id", f"#{index}") for index, ann in enumerate(data["annotations"])
                if not ann.get("segmentation") and not ann.get("iscrowd", 0)]
    if box_only and len(box_only) < len(data["annotations"]):
        message = (
            f"{json_file}: {len(box_only)} of {len(data['annotations'])} annotations have a box but no segmentation "
            f"(ids {box_only[:10]}{' ...' if len(box_only) > 10 else ''}): Mask R-CNN trains its mask head on the "
            "objects that have a mask (boxes train the rest), and mask AP treats box-only objects as ignore regions"
        )
        log.warning(message)
        warnings.warn(message, BoxOnlyAnnotationsWarning, stacklevel=2)

    dropped = sum(v for k, v in drops.items() if k.startswith(("degenerate", "box outside", "annotations left")))
    if drops:
        detail = ", ".join(f"{count} {reason}" for reason, count in sorted(drops.items()))
        message = f"{json_file}: dropped {dropped} of {len(data['annotations'])} annotations ({detail})"
        log.warning(message)
        warnings.warn(message, DroppedAnnotationsWarning, stacklevel=2)

    records = []
    for image_id in sorted(images):
        image = images[image_id]
        records.append({
            "file_name": str(image_root / image["file_name"]),
            "height": image["height"],
            "width": image["width"],
            "image_id": image_id,
            "annotations": per_image[image_id],
        })
    return records, categories


def load_image_info(json_file: str | Path, image_root: str | Path) -> tuple[list[dict], list[dict]]:
    """Predict records (``file_name``, ``image_id``, ``height``, ``width``) of the images listed by a COCO
    image-info json and its categories (empty when it has none).

    That json (e.g. COCO's ``image_info_test-dev2017.json``) gives the image ids an evaluation server
    scores; every image it lists must be in ``image_root`` (other files there are not predicted).
    """
    json_file, image_root = Path(json_file), Path(image_root)
    data = _read_json(json_file, ("images",), kind="COCO image-info")
    categories = _parse_categories(json_file, data.get("categories") or [])
    images = _parse_images(json_file, data["images"], image_root)
    records = [{"file_name": str(image_root / image["file_name"]), "image_id": image_id,
                "height": image["height"], "width": image["width"]} for image_id, image in sorted(images.items())]
    return records, categories


def register_coco_instances(json_file: str | Path, image_root: str | Path, split: str) -> str:
    """Register a COCO instances dataset in detectron2's catalogs (idempotent) and return its name.

    The name is unique to the resolved ``json_file`` + ``image_root``; loading happens on the first
    ``DatasetCatalog.get`` and is cached for the process.
    """
    json_file, image_root = Path(json_file).resolve(), Path(image_root).resolve()
    digest = hashlib.sha1(f"{json_file}|{image_root}".encode()).hexdigest()[:10]
    name = f"coco_{split}_{digest}"
    if name in DatasetCatalog.list():
        return name
    cache: dict[str, list[dict]] = {}

    def load() -> list[dict]:
        if "records" not in cache:
            records, categories = load_coco_instances(json_file, image_root)
            cache["records"] = records
            MetadataCatalog.get(name).set(
                thing_classes=[c["name"] for c in categories],
                thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
            )
        return cache["records"]

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(json_file=str(json_file), image_root=str(image_root), evaluator_type="coco")
    return name


# --------------------------------------------------------------------------------------------
# augmentation and mapping
# --------------------------------------------------------------------------------------------
class RandomChoice(T.Augmentation):
    """Apply one of several augmentation pipelines, chosen uniformly at random per image."""

    def __init__(self, pipelines: Sequence[Sequence[T.Augmentation]]) -> None:
        super().__init__()
        self.pipelines = [T.AugmentationList(list(p)) for p in pipelines]

    def __call__(self, aug_input: T.AugInput) -> T.Transform:
        return self.pipelines[np.random.randint(len(self.pipelines))](aug_input)

    def __repr__(self) -> str:
        return f"RandomChoice({self.pipelines})"


def build_augmentations(
    is_train: bool,
    augmentation: Augmentation = "multiscale",
    train_min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
    train_max_size: int = 1333,
    crop_resize_sizes: Sequence[int] = (400, 500, 600),
    crop_size: Sequence[int] = (384, 600),
    test_min_size: int = 800,
    test_max_size: int = 1333,
) -> list[T.Augmentation]:
    """detectron2 augmentations of the detection recipes.

    * ``multiscale``: horizontal flip + shortest side chosen from ``train_min_sizes`` (long side <=
      ``train_max_size``), the DETR / mmdetection multi-scale recipe;
    * ``detr``: flip, then with probability 1/2 the multi-scale resize, otherwise a resize to
      ``crop_resize_sizes``, a random crop of ``crop_size`` (min, max) pixels and the multi-scale
      resize (the recipe of FocalNet's Mask R-CNN and DINO configs);
    * ``none`` and evaluation: the fixed ``test_min_size`` / ``test_max_size`` resize.
    """
    fixed = T.ResizeShortestEdge(test_min_size, test_max_size)
    if not is_train or augmentation == "none":
        return [fixed]
    multiscale = T.ResizeShortestEdge(tuple(train_min_sizes), train_max_size, sample_style="choice")
    flip = T.RandomFlip(horizontal=True)
    if augmentation == "multiscale":
        return [flip, multiscale]
    if augmentation == "detr":
        crop = [
            T.ResizeShortestEdge(tuple(crop_resize_sizes), train_max_size, sample_style="choice"),
            T.RandomCrop("absolute_range", tuple(crop_size)),
            multiscale,
        ]
        return [flip, RandomChoice([[multiscale], crop])]
    raise ValueError(f"unknown augmentation {augmentation!r}; use 'multiscale', 'detr' or 'none'")


def _polygons_to_rle(segm: list, height: int, width: int) -> dict:
    return mask_utils.merge(mask_utils.frPyObjects(segm, height, width))


def _contains_crop(transforms: T.TransformList) -> bool:
    return any(isinstance(t, T.CropTransform) for t in transforms.transforms)


class COCOInstanceMapper:
    """Dataset dict -> model input dict (detectron2's ``DatasetMapper`` contract).

    Reads the image in ``image_format`` (errors name the file and image id), applies
    ``augmentations`` and, in training, builds ``instances`` (``gt_boxes``, ``gt_classes``,
    ``gt_masks`` when ``use_masks``) from the non-crowd annotations; crowd regions are left out of
    training, as in COCO practice (the evaluation treats them as ignore regions). When some
    annotations of an image have no mask, those get an empty one and ``gt_has_mask`` tells them
    apart (see :mod:`focalnet_pl.d2.partial_masks`: the mask head does not learn from them).
    """

    def __init__(self, augmentations: list[T.Augmentation], is_train: bool, image_format: str = "RGB", use_masks: bool = True) -> None:
        if image_format not in ("RGB", "BGR"):
            raise ValueError(f"image_format must be 'RGB' or 'BGR'; got {image_format!r}")
        self.augmentations = T.AugmentationList(augmentations)
        self.is_train = is_train
        self.image_format = image_format
        self.use_masks = use_masks

    def _read(self, record: dict) -> np.ndarray:
        image = np.asarray(read_image_rgb(record["file_name"]))
        if "height" in record and (image.shape[0], image.shape[1]) != (record["height"], record["width"]):
            raise ValueError(
                f"image {record['file_name']} (image_id={record.get('image_id')}) is "
                f"{image.shape[1]}x{image.shape[0]} but its annotation says {record['width']}x{record['height']}"
            )
        return image[:, :, ::-1] if self.image_format == "BGR" else image

    def __call__(self, record: dict) -> dict:
        image = self._read(record)
        original_height, original_width = image.shape[:2]
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        output = {
            "file_name": record["file_name"],
            "image_id": record["image_id"],
            "height": record.get("height", original_height),
            "width": record.get("width", original_width),
            "image": torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1))),
        }
        if not self.is_train:
            return output
        annotations = [copy.deepcopy(a) for a in record.get("annotations", []) if not a.get("iscrowd", 0)]
        crop = _contains_crop(transforms)
        for ann in annotations:
            if not self.use_masks:
                ann.pop("segmentation", None)
            elif crop and isinstance(ann.get("segmentation"), list):
                # cropping polygons needs shapely; a mask is cropped exactly without it
                ann["segmentation"] = _polygons_to_rle(ann["segmentation"], original_height, original_width)
        annotations = [d2_utils.transform_instance_annotations(a, transforms, image.shape[:2]) for a in annotations]
        has_mask = ["segmentation" in a for a in annotations]
        box_only = self.use_masks and not all(has_mask)
        if box_only:
            for ann in annotations:
                ann.setdefault("segmentation", [])  # an empty mask, left out of the mask loss by gt_has_mask
        all_polygons = all(isinstance(a.get("segmentation", []), list) for a in annotations)
        instances = d2_utils.annotations_to_instances(
            annotations, image.shape[:2], mask_format="polygon" if all_polygons else "bitmask"
        )
        if box_only:
            instances.gt_has_mask = torch.tensor(has_mask, dtype=torch.bool)
        output["instances"] = d2_utils.filter_empty_instances(instances, by_mask=False)
        return output


class MappedDataset(Dataset):
    """``mapper(records[i])`` for each record."""

    def __init__(self, records: Sequence[dict], mapper: Callable[[dict], dict]) -> None:
        self.records = records
        self.mapper = mapper

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.mapper(self.records[index])


def collate_as_list(batch: list[dict]) -> list[dict]:
    """detectron2 models take a list of per-image dicts of varying sizes."""
    return batch


class ListOfDictsDataModule(ResumableDataModule):
    """Base of the detectron2-format datamodules: the :class:`MappedDataset` of each split, set up in
    ``self._datasets``, served in detectron2's batches (lists of per-image dicts); shuffled, dropping
    the last batch, when training. Images are decoded in the loader's worker processes and, when CUDA is
    available, their tensors pinned, so the step copies them to the GPU without waiting."""

    def __init__(self, batch_size: int, eval_batch_size: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self._datasets: dict[str, MappedDataset] = {}

    def _loader(self, split: str, train: bool = False) -> GuardedLoader:
        if split not in self._datasets:
            raise ValueError(f"no {split} dataset: is it configured, and was setup() called for this stage?")
        return self.loader(
            self._datasets[split], f"{split}_dataloader", self.batch_size if train else self.eval_batch_size,
            train=train, drop_last=train, collate_fn=collate_as_list, num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """The records' tensors (image, segmentation maps) go to ``device`` without making the host wait;
        ``instances`` stay on the host, where the models check them before copying what they need
        (Lightning's default would copy every field of them, waiting for each copy)."""
        if not (isinstance(batch, list) and all(isinstance(record, dict) for record in batch)):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return [{key: value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
                 for key, value in record.items()} for record in batch]

    def train_dataloader(self) -> GuardedLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> GuardedLoader:
        return self._loader("val")

    def test_dataloader(self) -> GuardedLoader:
        return self._loader("test")

    def predict_dataloader(self) -> GuardedLoader:
        return self._loader("predict")


# --------------------------------------------------------------------------------------------
# datamodule
# --------------------------------------------------------------------------------------------
class COCODataModule(ListOfDictsDataModule):
    """COCO instances for detectron2 detectors (DINO, Mask R-CNN).

    Data: ``root`` with the standard layout (``train2017/``, ``val2017/``,
    ``annotations/instances_{train,val}2017.json``) and/or explicit ``{split}_json`` +
    ``{split}_images`` (these win over ``root``). ``test`` defaults to the val split; ``predict``
    uses ``predict_images`` (a folder, recursively) or else the val split. ``demo=True`` generates
    the demo shapes dataset (under ``root``, default ``data/demo_shapes``) and uses its COCO part.
    Missing data raises :class:`~datamodules.image_io.DataNotFoundError` naming the layout and the option.

    Args:
        augmentation, train_min_sizes, train_max_size, crop_resize_sizes, crop_size,
        test_min_size, test_max_size: see :func:`build_augmentations`.
        image_format: channel order given to the model; must equal the model's ``INPUT.FORMAT``.
        use_masks: give instance masks to the model (Mask R-CNN); off for box-only detectors.
        predict_image_info: COCO image-info json (e.g. ``image_info_test-dev2017.json``) giving the ids of
            the ``predict_images`` files; predict then runs on the images it lists, with their ids.
        batch_size: training images per device; ``eval_batch_size`` for val/test/predict.
    """

    def __init__(
        self,
        root: str | None = None,
        train_json: str | None = None,
        train_images: str | None = None,
        val_json: str | None = None,
        val_images: str | None = None,
        test_json: str | None = None,
        test_images: str | None = None,
        predict_images: str | None = None,
        predict_image_info: str | None = None,
        demo: bool = False,
        augmentation: Augmentation = "multiscale",
        train_min_sizes: Sequence[int] = tuple(range(480, 801, 32)),
        train_max_size: int = 1333,
        crop_resize_sizes: Sequence[int] = (400, 500, 600),
        crop_size: Sequence[int] = (384, 600),
        test_min_size: int = 800,
        test_max_size: int = 1333,
        image_format: Literal["RGB", "BGR"] = "RGB",
        use_masks: bool = True,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.save_hyperparameters()
        if not demo and root is None and not (train_json or val_json or test_json or predict_images):
            raise ValueError("COCODataModule needs root=..., explicit {split}_json/{split}_images, or demo=True")
        if root is not None and not demo and not Path(root).is_dir():
            raise DataNotFoundError(missing_data_message(f"COCO root folder {root}", COCO_LAYOUT,
                                                         "--data.init_args.root to your COCO folder"))
        if predict_image_info is not None and predict_images is None:
            raise ValueError("predict_image_info needs predict_images: the folder of the images it lists")
        self._root = root
        self._demo = demo
        self._explicit = {
            "train": (train_json, train_images),
            "val": (val_json, val_images),
            "test": (test_json, test_images),
        }
        for split, (json_file, images) in self._explicit.items():
            if (json_file is None) != (images is None):
                raise ValueError(f"give both {split}_json and {split}_images, or neither")
        self._names: dict[str, str] = {}
        self._predict_categories: list[dict] = []

    # ---- paths and catalog ------------------------------------------------------------------
    def _coco_root(self) -> Path | None:
        if self._demo:
            return Path(self._root or "data/demo_shapes") / "coco"
        return Path(self._root) if self._root else None

    def split_paths(self, split: Split) -> tuple[Path, Path] | None:
        """(json, image folder) of ``split``, or ``None`` when it is not configured."""
        json_file, images = self._explicit[split]
        if json_file is not None:
            return Path(json_file), Path(images)
        if split == "test":
            return self.split_paths("val")
        root = self._coco_root()
        if root is None:
            return None
        name = f"{split}2017"
        return root / "annotations" / f"instances_{name}.json", root / name

    def dataset_name(self, split: Split) -> str:
        """Registered detectron2 dataset name of ``split`` (registering it if needed)."""
        if split not in self._names:
            paths = self.split_paths(split)
            if paths is None:
                raise ValueError(f"no {split} data configured: set root, demo or {split}_json/{split}_images")
            json_file, images = paths
            missing = [f"{kind} {path}" for kind, path, present in (
                ("annotation file", json_file, json_file.is_file()), ("image folder", images, images.is_dir())
            ) if not present]
            if missing:
                raise DataNotFoundError(missing_data_message(
                    f"COCO {split} " + " and ".join(missing), COCO_LAYOUT, self._split_option(split)
                ))
            self._names[split] = register_coco_instances(json_file, images, split=split)
        return self._names[split]

    def _split_option(self, split: Split) -> str:
        """The command-line options that give ``split``'s data (for error messages)."""
        explicit = f"--data.init_args.{split}_json and --data.init_args.{split}_images"
        if self._explicit[split][0] is not None:
            return explicit
        if split == "test":
            return f"{self._split_option('val')} (test reads the val split unless {explicit} are set)"
        return f"--data.init_args.root to your COCO folder, or {explicit}"

    def dataset_metadata(self, split: Split) -> Metadata:
        """detectron2 metadata of ``split`` (loads the split to fill the category fields)."""
        name = self.dataset_name(split)
        DatasetCatalog.get(name)
        return MetadataCatalog.get(name)

    def _reference_split(self) -> Split:
        for split in ("train", "val", "test"):
            if split in self._datasets:
                return split
        for split in ("train", "val", "test"):
            if self.split_paths(split) is not None:
                return split
        raise ValueError("no annotated split configured")

    @property
    def metadata(self) -> Metadata:
        """Metadata (classes, id mapping) of the training split, else of the first split configured."""
        return self.dataset_metadata(self._reference_split())

    @property
    def num_classes(self) -> int:
        return len(self.metadata.thing_classes)

    @property
    def class_metadata(self) -> Metadata | None:
        """:attr:`metadata`, or ``None`` when no annotated split is configured (predict on a folder)."""
        annotated = any(self.split_paths(split) is not None for split in ("train", "val", "test"))
        return self.metadata if annotated else None

    @property
    def image_format(self) -> str:
        return self.hparams.image_format

    @property
    def eval_size(self) -> tuple[int, int]:
        return self.hparams.test_min_size, self.hparams.test_max_size

    def instance_ground_truth(self, split: Split) -> str:
        """The instances json of ``split``."""
        return self.dataset_metadata(split).json_file

    # ---- Lightning hooks --------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self._demo:
            ensure_demo_shapes(self._root or "data/demo_shapes")

    def _mapper(self, is_train: bool) -> COCOInstanceMapper:
        h = self.hparams
        augmentations = build_augmentations(
            is_train, h.augmentation, h.train_min_sizes, h.train_max_size, h.crop_resize_sizes, h.crop_size,
            h.test_min_size, h.test_max_size,
        )
        return COCOInstanceMapper(augmentations, is_train, h.image_format, h.use_masks)

    def _split_dataset(self, split: Split) -> MappedDataset:
        records = DatasetCatalog.get(self.dataset_name(split))
        self._check_same_classes(split)
        if split == "train" and self.hparams.use_masks and not any("segmentation" in a for r in records for a in r["annotations"]):
            warnings.warn(
                f"use_masks=True but no annotation of {self.split_paths(split)[0]} has a segmentation: a mask head "
                "learns nothing from it (box-only data: set --data.init_args.use_masks false and MODEL.MASK_ON false)",
                BoxOnlyAnnotationsWarning, stacklevel=2,
            )
        return MappedDataset(records, self._mapper(is_train=split == "train"))

    def _check_same_classes(self, split: Split) -> None:
        classes = MetadataCatalog.get(self.dataset_name(split)).thing_classes
        for other, name in self._names.items():
            other_meta = MetadataCatalog.get(name)
            if other != split and hasattr(other_meta, "thing_classes") and other_meta.thing_classes != classes:
                raise ValueError(
                    f"categories of the {split} json {self.split_paths(split)[0]} differ from those of the "
                    f"{other} json {self.split_paths(other)[0]}: {classes} vs {other_meta.thing_classes}"
                )

    def setup(self, stage: str) -> None:
        if self._demo:
            ensure_demo_shapes(self._root or "data/demo_shapes")
        wanted: dict[str, list[Split]] = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}
        for split in wanted[stage]:
            if split not in self._datasets and (split != "val" or stage != "fit" or self.split_paths(split) is not None):
                self._datasets[split] = self._split_dataset(split)
        if stage == "predict":
            self._datasets["predict"] = self._predict_dataset()

    def _predict_dataset(self) -> MappedDataset:
        folder = self.hparams.predict_images
        if folder is None:
            return MappedDataset(DatasetCatalog.get(self.dataset_name("val")), self._mapper(is_train=False))
        if self.hparams.predict_image_info is not None:
            records, self._predict_categories = load_image_info(self.hparams.predict_image_info, folder)
        else:
            images = predict_image_files(folder)
            records = [{"file_name": str(path), "image_id": index + 1} for index, path in enumerate(images)]
        return MappedDataset(records, self._mapper(is_train=False))

    @property
    def predict_split_name(self) -> str | None:
        """The COCO split whose image ids the predict images carry (``test-dev2017`` for
        ``image_info_test-dev2017.json``, ``val2017`` when predicting on the val split); ``None`` when
        the ids are only the images' running number (a folder without ``predict_image_info``)."""
        if self.hparams.predict_images is None:
            json_file = self.split_paths("val")[0] if self.split_paths("val") else None
        else:
            json_file = self.hparams.predict_image_info
        if json_file is None:
            return None
        stem = Path(json_file).stem
        for prefix in ("image_info_", "instances_"):
            stem = stem.removeprefix(prefix)
        return stem

    @property
    def predict_categories(self) -> list[dict]:
        """Categories (``id``, ``name``) of ``predict_image_info`` once set up for predict (empty without
        one, or when it lists none)."""
        return self._predict_categories

"""COCO panoptic segmentation (panopticapi format) for Mask2Former, also used for ADE20K panoptic.

Layout (as detectron2 expects it): ``root/{train,val}2017/*.jpg``,
``root/panoptic_{train,val}2017/*.png`` and ``root/annotations/panoptic_{train,val}2017.json``.
The json lists ``images``, ``annotations`` (``file_name`` of the PNG, ``segments_info`` with
``id``, ``category_id``, ``iscrowd``) and ``categories`` (``id``, ``name``, ``isthing``, ``color``).
Category ids become contiguous class indices in id order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
from detectron2.data import Metadata
from pycocotools import mask as mask_utils

from datamodules.demo_shapes import ensure_demo_shapes
from datamodules.image_io import DataNotFoundError, missing_data_message
from datamodules.segmentation import Augmentation, SegmentationClasses, SegmentationDataModule, read_panoptic_png

__all__ = ["COCOPanopticDataModule", "PanopticDataModule", "instances_from_panoptic", "load_panoptic_json"]


def _read_json(json_file: Path) -> dict:
    if not json_file.is_file():
        raise DataNotFoundError(f"panoptic annotation file not found: {json_file}")
    try:
        data = json.loads(json_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed panoptic json {json_file}: {error}") from error
    for section in ("images", "annotations", "categories"):
        if not isinstance(data, dict) or not isinstance(data.get(section), list):
            raise ValueError(f"malformed panoptic json {json_file}: missing list {section!r}")
    if not data["categories"]:
        raise ValueError(f"malformed panoptic json {json_file}: 'categories' is empty")
    return data


def instances_from_panoptic(records: list[dict], classes: SegmentationClasses) -> dict:
    """COCO instances ground truth (``images``, ``annotations`` with RLE masks, ``categories``) of the
    thing segments of panoptic ``records``, in dataset category ids; crowd segments keep ``iscrowd``.
    Segments without pixels are left out (no instance to detect)."""
    images, annotations = [], []
    for record in records:
        ids = read_panoptic_png(record["pan_seg_file_name"])
        height, width = ids.shape
        images.append({"id": record["image_id"], "height": height, "width": width, "file_name": record["file_name"]})
        for segment in record["segments_info"]:
            mask = ids == segment["id"]
            if not classes.is_thing[segment["category_id"]] or not mask.any():
                continue
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": record["image_id"],
                "category_id": classes.dataset_ids[segment["category_id"]],
                "segmentation": rle,
                "area": float(mask.sum()),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": segment["iscrowd"],
            })
    categories = [
        {"id": dataset_id, "name": name}
        for dataset_id, name, thing in zip(classes.dataset_ids, classes.names, classes.is_thing) if thing
    ]
    return {"images": images, "annotations": annotations, "categories": categories}


def load_panoptic_json(
    json_file: str | Path, image_root: str | Path, panoptic_root: str | Path
) -> tuple[list[dict], SegmentationClasses]:
    """Records for :class:`~datamodules.segmentation.SegmentationMapper` and the label space.

    Raises (naming the json and the entry) on malformed entries, unknown categories or image ids,
    duplicate segment ids, and missing image / PNG files. Only annotated images become records.
    """
    json_file, image_root, panoptic_root = Path(json_file), Path(image_root), Path(panoptic_root)
    data = _read_json(json_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    for category in categories:
        if not {"id", "name", "isthing"} <= set(category):
            raise ValueError(f"{json_file}: category {category} needs 'id', 'name' and 'isthing'")
    if len({c["id"] for c in categories}) != len(categories):
        raise ValueError(f"{json_file}: duplicate category ids")
    to_contiguous = {c["id"]: i for i, c in enumerate(categories)}
    classes = SegmentationClasses(
        names=[c["name"] for c in categories],
        is_thing=[bool(c["isthing"]) for c in categories],
        dataset_ids=[c["id"] for c in categories],
        colors=[tuple(c["color"]) for c in categories] if all("color" in c for c in categories) else [],
    )
    images = {image["id"]: image for image in data["images"]}
    records = []
    for index, annotation in enumerate(data["annotations"]):
        where = f"{json_file}: annotations[{index}] (image_id={annotation.get('image_id')!r})"
        image = images.get(annotation.get("image_id"))
        if image is None:
            raise ValueError(f"{where} refers to an image id not in 'images'")
        segments = []
        for segment in annotation.get("segments_info", []):
            if segment.get("category_id") not in to_contiguous:
                raise ValueError(f"{where}: segment {segment.get('id')} has unknown category_id {segment.get('category_id')!r}")
            contiguous = to_contiguous[segment["category_id"]]
            entry = {
                "id": int(segment["id"]),
                "category_id": contiguous,
                "iscrowd": int(segment.get("iscrowd", 0)),
                "isthing": classes.is_thing[contiguous],
            }
            if "area" in segment:  # scored as panopticapi does: the recorded area, not the PNG's pixels
                entry["area"] = int(segment["area"])
            segments.append(entry)
        if len({s["id"] for s in segments}) != len(segments):
            raise ValueError(f"{where}: duplicate segment ids")
        image_file = image_root / image["file_name"]
        png_file = panoptic_root / annotation["file_name"]
        for path in (image_file, png_file):
            if not path.is_file():
                raise DataNotFoundError(f"{path} (from {where}) does not exist")
        records.append({
            "file_name": str(image_file),
            "pan_seg_file_name": str(png_file),
            "json_file": str(json_file),
            "image_id": image["id"],
            "height": image.get("height"),
            "width": image.get("width"),
            "segments_info": segments,
        })
    if not records:
        raise ValueError(f"{json_file} has no annotations")
    return records, classes


class PanopticDataModule(SegmentationDataModule):
    """Panoptic segmentation from explicit panopticapi files per split (``test`` defaults to ``val``).

    ``val_instances_json``: COCO instances ground truth for the instance AP of models with
    ``INSTANCE_ON`` (as Mask2Former scores COCO panoptic against ``instances_val2017.json``); without
    it the instances are the thing segments of the panoptic annotation (see :func:`instances_from_panoptic`).
    """

    task = "panoptic"
    seg_pad_value = 0
    #: named in missing-data errors (``{split}`` is filled in): the files expected and the options that give them
    data_layout = ("  {split}_json: panopticapi json (images, annotations, categories)\n"
                   "  {split}_images: folder of the images\n  {split}_panoptic: folder of the panoptic PNGs")
    data_option = "--data.init_args.{split}_json, --data.init_args.{split}_images and --data.init_args.{split}_panoptic"

    def __init__(
        self,
        train_json: str | None = None,
        train_images: str | None = None,
        train_panoptic: str | None = None,
        val_json: str | None = None,
        val_images: str | None = None,
        val_panoptic: str | None = None,
        val_instances_json: str | None = None,
        augmentation: Augmentation = "lsj",
        crop_size: int = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        photometric: bool = False,
        test_size: int = 800,
        test_max_size: int = 1333,
        predict_images: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        super().__init__(augmentation, crop_size, min_scale, max_scale, photometric, test_size, test_max_size,
                         predict_images, batch_size, eval_batch_size, num_workers)
        self._paths = {
            "train": (train_json, train_images, train_panoptic),
            "val": (val_json, val_images, val_panoptic),
        }
        self.val_instances_json = val_instances_json
        self._default_instances_json: Path | None = None  # used when it exists and none is given
        self._records: dict[str, list[dict]] = {}
        self._derived_instances: dict | None = None

    def split_paths(self, split: str) -> tuple[Path, Path, Path]:
        """(json, image folder, panoptic PNG folder) of ``split``."""
        split = "val" if split == "test" else split
        paths = self._paths[split]
        if any(p is None for p in paths):
            raise ValueError(f"{type(self).__name__}: the {split} split needs its json, image and panoptic folders")
        return tuple(Path(p) for p in paths)  # type: ignore[return-value]

    def _load(self, split: str) -> list[dict]:
        split = "val" if split == "test" else split
        if split not in self._records:
            self._check_present(split)
            records, classes = load_panoptic_json(*self.split_paths(split))
            if self._classes is not None and classes.names != self._classes.names:
                raise ValueError(f"categories of {self.split_paths(split)[0]} differ from those of the other split")
            self._classes = classes
            self._records[split] = records
        return self._records[split]

    def _check_present(self, split: str) -> None:
        json_file, images, panoptic = self.split_paths(split)
        missing = [f"{kind} {path}" for kind, path, present in (
            ("annotation file", json_file, json_file.is_file()), ("image folder", images, images.is_dir()),
            ("panoptic PNG folder", panoptic, panoptic.is_dir()),
        ) if not present]
        if missing:
            raise self._data_not_found(f"{type(self).__name__} {split} " + " and ".join(missing), split)

    def _data_not_found(self, what: str, split: str = "train") -> DataNotFoundError:
        """The error for missing data ``what``, with this datamodule's layout and option."""
        return DataNotFoundError(missing_data_message(
            what, self.data_layout.format(split=split), self.data_option.format(split=split)
        ))

    def load_classes(self) -> SegmentationClasses:
        for split in ("train", "val"):
            if all(p is not None for p in self._paths[split]):
                self._load(split)
                assert self._classes is not None
                return self._classes
        raise ValueError(f"{type(self).__name__}: no split configured")

    def records(self, split: Literal["train", "val", "test"]) -> list[dict]:
        return self._load(split)

    @property
    def class_metadata(self) -> Metadata | None:
        """:attr:`metadata`, or ``None`` when no split is configured (predict on a folder)."""
        configured = any(all(p is not None for p in paths) for paths in self._paths.values())
        return self.metadata if configured else None

    def instance_ground_truth(self, split: str = "val") -> str | dict:
        """COCO instances ground truth of the val/test split (``split``: either): ``val_instances_json`` (or the dataset's
        standard instances file when it exists), else the dict :func:`instances_from_panoptic` makes of
        the panoptic annotation (built once)."""
        if self.val_instances_json is not None:
            if not Path(self.val_instances_json).is_file():
                raise FileNotFoundError(f"val_instances_json {self.val_instances_json} does not exist")
            return self.val_instances_json
        if self._default_instances_json is not None and self._default_instances_json.is_file():
            return str(self._default_instances_json)
        if self._derived_instances is None:
            self._derived_instances = instances_from_panoptic(self.records("val"), self.classes)
        return self._derived_instances


class COCOPanopticDataModule(PanopticDataModule):
    """COCO panoptic under ``root`` (standard layout, see the module docstring), or the generated demo
    shapes (``demo=True``; ``root`` defaults to ``data/demo_shapes``). Recipe defaults: large-scale jitter
    (0.1-2.0) with 1024 crops, evaluation at shortest side 800. Instance AP is scored against
    ``annotations/instances_val2017.json`` when that file exists (the official Mask2Former evaluation)."""

    data_layout = ("  <root>/annotations/panoptic_{{train,val}}2017.json\n  <root>/{{train,val}}2017/<image files>\n"
                   "  <root>/panoptic_{{train,val}}2017/<PNG files>")
    data_option = "--data.init_args.root to your COCO folder"

    def __init__(
        self,
        root: str | None = None,
        demo: bool = False,
        augmentation: Augmentation = "lsj",
        crop_size: int = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        photometric: bool = False,
        test_size: int = 800,
        test_max_size: int = 1333,
        predict_images: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        if root is None and not demo:
            raise ValueError("COCOPanopticDataModule needs root=... or demo=True")
        if not demo and not Path(root).is_dir():
            raise self._data_not_found(f"COCO root folder {root}")
        demo_root = Path(root or "data/demo_shapes") if demo else None
        coco = demo_root / "coco" if demo_root is not None else Path(root)  # type: ignore[arg-type]
        super().__init__(
            **{
                f"{split}_{kind}": str(path)
                for split in ("train", "val")
                for kind, path in (
                    ("json", coco / "annotations" / f"panoptic_{split}2017.json"),
                    ("images", coco / f"{split}2017"),
                    ("panoptic", coco / f"panoptic_{split}2017"),
                )
            },
            augmentation=augmentation, crop_size=crop_size, min_scale=min_scale, max_scale=max_scale,
            photometric=photometric, test_size=test_size, test_max_size=test_max_size,
            predict_images=predict_images, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )
        self._demo_root = demo_root
        self._default_instances_json = coco / "annotations" / "instances_val2017.json"
        if demo_root is not None:
            ensure_demo_shapes(demo_root)

    def prepare_data(self) -> None:
        if self._demo_root is not None:
            ensure_demo_shapes(self._demo_root)

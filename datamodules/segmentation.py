"""Shared pieces of the segmentation datamodules (ADE20K semantic/panoptic, COCO panoptic).

* :class:`SegmentationClasses` describes the label space (names, things vs stuff, colours, the
  dataset's category ids) and gives detectron2 :class:`Metadata` for visualisation.
* :class:`SegmentationMapper` turns a record into a Mask2Former input: the augmented image and, for
  training, ``instances`` (one binary mask per semantic class, or per non-crowd panoptic segment);
  for evaluation, the untouched ground truth (``sem_seg_gt``, ``pan_seg_gt`` + ``segments_info``).
  Label files are checked against their image and annotation; errors name both files.
* :func:`build_segmentation_augmentations`: the ADE20K recipe (multi-scale resize to 0.5-2.0 x the
  crop, random crop, SSD colour jitter, flip, padding to the crop size) and COCO's large-scale jitter.
* :class:`SegmentationDataModule`: loaders, metadata and the predict split; subclasses list records.
"""

from __future__ import annotations

import colorsys
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from detectron2.data import Metadata
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform
from detectron2.structures import Instances
from PIL import Image

from datamodules.coco import ListOfDictsDataModule, MappedDataset
from datamodules.image_io import predict_image_files, read_image_rgb

__all__ = [
    "IGNORE_LABEL",
    "LabelFileError",
    "PadToSize",
    "SegmentationClasses",
    "SegmentationDataModule",
    "SegmentationMapper",
    "build_segmentation_augmentations",
    "read_label_png",
    "read_panoptic_png",
]

IGNORE_LABEL = 255
Augmentation = Literal["ade", "lsj", "none"]


class LabelFileError(ValueError):
    """A label/panoptic PNG does not fit its image or its annotation (the message names the files)."""


@dataclass
class SegmentationClasses:
    """Label space: contiguous class ``i`` is ``names[i]`` (dataset category id ``dataset_ids[i]``)."""

    names: list[str]
    is_thing: list[bool]
    dataset_ids: list[int] = field(default_factory=list)
    colors: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if len(self.is_thing) != len(self.names):
            raise ValueError(f"{len(self.names)} class names but {len(self.is_thing)} is_thing flags")
        if not self.dataset_ids:
            self.dataset_ids = list(range(len(self.names)))
        if not self.colors:
            self.colors = [
                tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.618034 * i) % 1.0, 0.65, 0.95))
                for i in range(len(self.names))
            ]

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def thing_class_ids(self) -> list[int]:
        """Contiguous ids of the thing classes."""
        return [i for i, thing in enumerate(self.is_thing) if thing]

    def metadata(self, name: str = "segmentation") -> Metadata:
        """detectron2 metadata in the convention of Mask2Former's panoptic datasets (contiguous ids
        index both ``thing_classes`` and ``stuff_classes``)."""
        metadata = Metadata(name=name)
        metadata.set(
            thing_classes=list(self.names),
            stuff_classes=list(self.names),
            thing_colors=[tuple(c) for c in self.colors],
            stuff_colors=[tuple(c) for c in self.colors],
            thing_dataset_id_to_contiguous_id={d: i for i, d in enumerate(self.dataset_ids) if self.is_thing[i]},
            stuff_dataset_id_to_contiguous_id={d: i for i, d in enumerate(self.dataset_ids)},
            ignore_label=IGNORE_LABEL,
        )
        return metadata


def read_label_png(path: str | Path) -> np.ndarray:
    """A single-channel label PNG as a (H, W) uint8 array (errors name the file)."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise LabelFileError(f"label PNG {path} has mode {image.mode}; expected one channel (L or P)")
            array = np.asarray(image)
    except (OSError, SyntaxError) as error:
        raise LabelFileError(f"cannot read label PNG {path}: {error}") from error
    if array.max(initial=0) > 255:
        raise LabelFileError(f"label PNG {path} has values > 255")
    return array.astype(np.uint8)


def read_panoptic_png(path: str | Path) -> np.ndarray:
    """A panopticapi PNG (id = R + 256 G + 256^2 B) as a (H, W) int64 segment-id map."""
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB")).astype(np.int64)
    except (OSError, SyntaxError) as error:
        raise LabelFileError(f"cannot read panoptic PNG {path}: {error}") from error
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


class PadToSize(T.Augmentation):
    """Pad at the bottom and right to ``size`` x ``size`` (images with ``pad_value``, labels with
    ``seg_pad_value``), as Mask2Former's ADE20K mappers pad training crops (``INPUT.SIZE_DIVISIBILITY``)."""

    def __init__(self, size: int, pad_value: float = 128.0, seg_pad_value: int = IGNORE_LABEL) -> None:
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        height, width = image.shape[:2]
        if height > self.size or width > self.size:
            raise ValueError(f"cannot pad a {width}x{height} image to {self.size}x{self.size}")
        return T.PadTransform(0, 0, self.size - width, self.size - height, width, height,
                              self.pad_value, self.seg_pad_value)


def build_segmentation_augmentations(
    is_train: bool,
    augmentation: Augmentation,
    crop_size: int,
    seg_pad_value: int,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    photometric: bool = True,
    test_size: int = 512,
    test_max_size: int = 2048,
) -> list[T.Augmentation]:
    """Training / evaluation augmentations.

    * ``ade`` (Mask2Former ADE20K): shortest side from ``{0.5, 0.6, ..., 2.0} x crop_size`` (long side
      <= 4 x crop_size), random ``crop_size`` crop, SSD colour jitter (detectron2's
      ``ColorAugSSDTransform``: brightness +-32, contrast and saturation x [0.5, 1.5], hue +-18 in
      OpenCV's 0-180 units), horizontal flip, then padding to ``crop_size`` x ``crop_size`` (image 128,
      labels ``seg_pad_value``) as the official mapper's ``SIZE_DIVISIBILITY`` does;
    * ``lsj`` (COCO large-scale jitter): resize to ``[min_scale, max_scale] x crop_size``, random crop /
      pad to ``crop_size`` (segmentation pad ``seg_pad_value``), flip;
    * ``none`` and evaluation: shortest side ``test_size`` (long side <= ``test_max_size``).
    """
    if not is_train or augmentation == "none":
        return [T.ResizeShortestEdge(test_size, test_max_size)]
    flip = T.RandomFlip(horizontal=True)
    colour = [ColorAugSSDTransform(img_format="RGB")] if photometric else []
    if augmentation == "ade":
        sizes = sorted({int(round(crop_size * step / 10)) for step in range(int(min_scale * 10), int(max_scale * 10) + 1)})
        return [
            T.ResizeShortestEdge(sizes, 4 * crop_size, sample_style="choice"),
            T.RandomCrop("absolute", (crop_size, crop_size)),
            *colour,
            flip,
            PadToSize(crop_size, seg_pad_value=seg_pad_value),
        ]
    if augmentation == "lsj":
        return [
            T.ResizeScale(min_scale, max_scale, crop_size, crop_size),
            T.FixedSizeCrop((crop_size, crop_size), pad_value=128.0, seg_pad_value=seg_pad_value),
            *colour,
            flip,
        ]
    raise ValueError(f"unknown augmentation {augmentation!r}; use 'ade', 'lsj' or 'none'")


def _check_same_size(image: np.ndarray, label: np.ndarray, image_file: str, label_file: str) -> None:
    if image.shape[:2] != label.shape[:2]:
        raise LabelFileError(
            f"label {label_file} is {label.shape[1]}x{label.shape[0]} but its image {image_file} is "
            f"{image.shape[1]}x{image.shape[0]}"
        )


class SegmentationMapper:
    """Record -> model input (see the module docstring).

    Records carry ``file_name`` and ``image_id`` plus ``sem_seg_file_name`` and/or ``pan_seg_file_name`` +
    ``segments_info`` (contiguous ``category_id``, ``iscrowd``, ``area``) + ``json_file``; records with
    neither are images to predict. The semantic PNG holds ADE's raw labels (``sem_seg_format: "ade"``, the
    default: 0 = unlabelled, class ``i`` stored as ``i + 1``) or detectron2's (``"detectron2"``: class
    ``i`` as ``i``, 255 ignored, e.g. ADE20K's ``annotations_detectron2``). Panoptic records train from
    the panoptic PNG and, when they name a semantic PNG too, are scored for mIoU against it (else against
    labels derived from the panoptic PNG). One difference from the official mappers: a panoptic segment the
    crop leaves without pixels is dropped here, where they keep it as a target with an empty mask.
    """

    def __init__(self, augmentations: list[T.Augmentation], is_train: bool, classes: SegmentationClasses) -> None:
        self.augmentations = T.AugmentationList(augmentations)
        self.is_train = is_train
        self.classes = classes

    def _semantic_label(self, record: dict, image: np.ndarray) -> np.ndarray:
        label = read_label_png(record["sem_seg_file_name"])
        _check_same_size(image, label, record["file_name"], record["sem_seg_file_name"])
        label_format = record.get("sem_seg_format", "ade")
        if label_format not in ("ade", "detectron2"):
            raise ValueError(f"record {record['file_name']}: unknown sem_seg_format {label_format!r}")
        # ADE: 0 (unlabelled) -> 255 via uint8 wrap-around, class i + 1 -> i; detectron2: as stored
        shifted = label - np.uint8(1) if label_format == "ade" else label
        bad = (shifted >= self.classes.num_classes) & (shifted != IGNORE_LABEL)
        if bad.any():
            raise LabelFileError(
                f"label {record['sem_seg_file_name']} (image {record['file_name']}, {label_format} format) has values "
                f"{sorted(np.unique(label[bad]).tolist())[:10]} above the {self.classes.num_classes} classes"
            )
        return shifted

    def _panoptic_ids(self, record: dict, image: np.ndarray) -> np.ndarray:
        ids = read_panoptic_png(record["pan_seg_file_name"])
        _check_same_size(image, ids, record["file_name"], record["pan_seg_file_name"])
        known = {segment["id"] for segment in record["segments_info"]}
        unknown = sorted(set(np.unique(ids).tolist()) - known - {0})
        if unknown:
            raise LabelFileError(
                f"panoptic PNG {record['pan_seg_file_name']} has segment ids {unknown[:10]} that its annotation "
                f"(image_id={record['image_id']}) in {record.get('json_file', '?')} does not list"
            )
        return ids

    def _semantic_from_panoptic(self, ids: np.ndarray, segments: list[dict]) -> np.ndarray:
        semantic = np.full(ids.shape, IGNORE_LABEL, dtype=np.uint8)
        for segment in segments:
            semantic[ids == segment["id"]] = segment["category_id"]
        return semantic

    def __call__(self, record: dict) -> dict[str, Any]:
        image = np.asarray(read_image_rgb(record["file_name"]))
        output: dict[str, Any] = {
            "file_name": record["file_name"],
            "image_id": record["image_id"],
            "height": image.shape[0],
            "width": image.shape[1],
        }
        label = ids = None
        if "pan_seg_file_name" in record:
            ids = self._panoptic_ids(record, image)
        if "sem_seg_file_name" in record and (ids is None or not self.is_train):
            label = self._semantic_label(record, image)

        if not self.is_train:
            if ids is not None:
                output["pan_seg_gt"] = torch.from_numpy(ids)
                output["segments_info"] = record["segments_info"]
                if label is None:
                    label = self._semantic_from_panoptic(ids, record["segments_info"])
            if label is not None:
                output["sem_seg_gt"] = torch.from_numpy(label.astype(np.int64))
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            output["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
            return output

        segments = [s for s in record.get("segments_info", []) if not s.get("iscrowd", 0)]
        if ids is not None:
            # compact index map (0 = void) so nearest-neighbour resizing stays exact
            index_map = np.zeros(ids.shape, dtype=np.uint8 if len(segments) < 255 else np.float32)
            for position, segment in enumerate(segments, start=1):
                index_map[ids == segment["id"]] = position
            label = index_map
        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image, label = aug_input.image, aug_input.sem_seg
        output["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))

        if label is None:
            raise ValueError(f"training record {record['file_name']} has no sem_seg_file_name or pan_seg_file_name")
        label_tensor = torch.as_tensor(np.round(label).astype(np.int64))
        instances = Instances(image.shape[:2])
        if ids is None:
            classes = [c for c in torch.unique(label_tensor).tolist() if c != IGNORE_LABEL]
            masks = [label_tensor == c for c in classes]
        else:
            masks = [label_tensor == position for position in range(1, len(segments) + 1)]
            classes = [segment["category_id"] for segment in segments]
            keep = [i for i, m in enumerate(masks) if m.any()]
            masks, classes = [masks[i] for i in keep], [classes[i] for i in keep]
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_masks = (
            torch.stack(masks) if masks else torch.zeros((0, *image.shape[:2]), dtype=torch.bool)
        )
        output["instances"] = instances
        return output


class SegmentationDataModule(ListOfDictsDataModule, ABC):
    """Common datamodule logic; subclasses implement :meth:`classes` and :meth:`records`.

    Args:
        augmentation, crop_size, min_scale, max_scale, photometric, test_size, test_max_size:
            see :func:`build_segmentation_augmentations`.
        predict_images: folder of images for ``predict`` (default: the validation split).
        batch_size: training images per device; ``eval_batch_size`` for val/test/predict.
    """

    #: "semantic" or "panoptic": the kind of ground truth the evaluation receives.
    task: str = "semantic"
    #: channel order of the images given to the model
    image_format: str = "RGB"
    seg_pad_value: int = IGNORE_LABEL

    def __init__(
        self,
        augmentation: Augmentation = "ade",
        crop_size: int = 512,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        photometric: bool = True,
        test_size: int = 512,
        test_max_size: int = 2048,
        predict_images: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers)
        self.augmentation = augmentation
        self.crop_size = crop_size
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.photometric = photometric
        self.test_size = test_size
        self.test_max_size = test_max_size
        self.predict_images = predict_images
        self._classes: SegmentationClasses | None = None

    # ---- what each dataset format provides ---------------------------------------------------------
    @abstractmethod
    def load_classes(self) -> SegmentationClasses:
        """The dataset's classes (names, thing/stuff, colours)."""

    @abstractmethod
    def records(self, split: Literal["train", "val", "test"]) -> list[dict]:
        """detectron2 dataset dicts of ``split``."""

    # ---- metadata -----------------------------------------------------------------------------
    @property
    def classes(self) -> SegmentationClasses:
        if self._classes is None:
            self._classes = self.load_classes()
        return self._classes

    @property
    def num_classes(self) -> int:
        return self.classes.num_classes

    @property
    def metadata(self) -> Metadata:
        """detectron2 metadata (class names, colours, things) for evaluation and visualisation."""
        metadata = self.classes.metadata(type(self).__name__)
        metadata.set(evaluator_type=self.task, thing_class_ids=self.classes.thing_class_ids)
        return metadata

    @property
    def class_metadata(self) -> Metadata:
        return self.metadata

    def dataset_metadata(self, split: str) -> Metadata:
        """:attr:`metadata` (every split has the same classes)."""
        return self.metadata

    def instance_ground_truth(self, split: str) -> str | dict:
        raise ValueError(f"{type(self).__name__} has no instance ground truth: instance AP needs panoptic data")

    @property
    def eval_size(self) -> tuple[int, int]:
        return self.test_size, self.test_max_size

    # ---- Lightning hooks ----------------------------------------------------------------------
    def mapper(self, is_train: bool) -> SegmentationMapper:
        augmentations = build_segmentation_augmentations(
            is_train, self.augmentation, self.crop_size, self.seg_pad_value, self.min_scale, self.max_scale,
            self.photometric, self.test_size, self.test_max_size,
        )
        return SegmentationMapper(augmentations, is_train, self.classes)

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": []}[stage]
        for split in wanted:
            if split not in self._datasets:
                self._datasets[split] = MappedDataset(self.records(split), self.mapper(is_train=split == "train"))
        if stage == "predict" and "predict" not in self._datasets:
            if self.predict_images is None:
                records = self.records("val")
            else:
                images = predict_image_files(self.predict_images)
                records = [{"file_name": str(path), "image_id": path.stem} for path in images]
            self._datasets["predict"] = MappedDataset(records, self.mapper(is_train=False))


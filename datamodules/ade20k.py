"""ADE20K (SceneParsing, ``ADEChallengeData2016``) semantic and panoptic segmentation.

* Semantic: ``root/ADEChallengeData2016/images/{training,validation}/*.jpg`` with label PNGs of the
  same stem in ``annotations/{training,validation}``; label 0 is "other" (ignored, becomes 255),
  labels 1..150 become classes 0..149.
* Panoptic (converted with Mask2Former's ``prepare_ade20k_pan_seg.py``):
  ``ADEChallengeData2016/ade20k_panoptic_{train,val}.json`` and PNG folders ``ade20k_panoptic_{train,val}/``.
  Its mIoU is scored, as the official evaluation does, against the semantic annotations:
  ``annotations_detectron2/{training,validation}`` (``prepare_ade20k_sem_seg.py``) when present, else
  the raw ``annotations/`` they are made from (the same labels).

Recipe defaults are Mask2Former's: multi-scale (0.5-2.0) resize, 512 crops for semantic segmentation
(640 for the large models, set ``crop_size``) and 640 for panoptic, SSD colour jitter and flips, crops
padded to the crop size; evaluation at shortest side ``crop_size``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from datamodules.coco_panoptic import PanopticDataModule
from datamodules.demo_shapes import ADE_CLASS_NAMES, ensure_demo_shapes
from datamodules.image_io import DataNotFoundError, list_image_files, missing_data_message
from datamodules.segmentation import Augmentation, SegmentationClasses, SegmentationDataModule

__all__ = ["ADE20KPanopticDataModule", "ADE20KSemanticDataModule", "list_ade_pairs"]

_ADE_SPLITS = {"train": "training", "val": "validation", "test": "validation"}
#: named in missing-data errors
ADE_SEMANTIC_LAYOUT = ("  <root>/ADEChallengeData2016/images/{training,validation}/<image files>\n"
                       "  <root>/ADEChallengeData2016/annotations/{training,validation}/<label PNGs, same names>")
ADE_ROOT_OPTION = "--data.init_args.root to the folder holding ADEChallengeData2016/"


def list_ade_pairs(dataset_root: str | Path, split: str) -> list[dict]:
    """Image/label record pairs of an ADE-style split; an image without its label PNG is an error."""
    dataset_root = Path(dataset_root)
    image_dir = dataset_root / "images" / split
    label_dir = dataset_root / "annotations" / split
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise DataNotFoundError(missing_data_message(f"ADE20K folder {folder}", ADE_SEMANTIC_LAYOUT, ADE_ROOT_OPTION))
    images, _ = list_image_files(image_dir, recursive=False)
    if not images:
        raise DataNotFoundError(f"no images in {image_dir}")
    records = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise FileNotFoundError(f"image {image} has no label PNG {label}")
        records.append({"file_name": str(image), "sem_seg_file_name": str(label), "image_id": image.stem})
    return records


class ADE20KSemanticDataModule(SegmentationDataModule):
    """ADE20K semantic segmentation (150 classes) under ``root/ADEChallengeData2016``.

    ``demo=True`` uses the ADE-style part of the generated demo shapes (7 classes); ``class_names``
    overrides the label space for other ADE-format datasets.
    """

    task = "semantic"

    def __init__(
        self,
        root: str | None = None,
        demo: bool = False,
        class_names: list[str] | None = None,
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
        super().__init__(augmentation, crop_size, min_scale, max_scale, photometric, test_size, test_max_size,
                         predict_images, batch_size, eval_batch_size, num_workers)
        if root is None and not demo:
            raise ValueError("ADE20KSemanticDataModule needs root=... or demo=True")
        if not demo and not Path(root).is_dir():
            raise DataNotFoundError(missing_data_message(f"ADE20K root folder {root}", ADE_SEMANTIC_LAYOUT, ADE_ROOT_OPTION))
        self._demo_root = Path(root or "data/demo_shapes") if demo else None
        self.dataset_root = (self._demo_root / "ade" if demo else Path(root)) / "ADEChallengeData2016"  # type: ignore[arg-type]
        if class_names is None:
            class_names = list(ADE_CLASS_NAMES) if demo else list(ADE20K_SEM_SEG_CATEGORIES)
        self.class_names = list(class_names)

    def prepare_data(self) -> None:
        if self._demo_root is not None:
            ensure_demo_shapes(self._demo_root)

    def setup(self, stage: str) -> None:
        self.prepare_data()  # idempotent; for a datamodule used outside a Trainer
        super().setup(stage)

    def load_classes(self) -> SegmentationClasses:
        return SegmentationClasses(names=self.class_names, is_thing=[False] * len(self.class_names))

    def records(self, split: Literal["train", "val", "test"]) -> list[dict]:
        return list_ade_pairs(self.dataset_root, _ADE_SPLITS[split])


class ADE20KPanopticDataModule(PanopticDataModule):
    """ADE20K panoptic (150 categories: 100 things, 50 stuff) under ``root/ADEChallengeData2016``; the
    records also name their semantic annotation (see the module docstring)."""

    data_layout = ("  <root>/ADEChallengeData2016/ade20k_panoptic_{{train,val}}.json\n"
                   "  <root>/ADEChallengeData2016/images/{{training,validation}}/<image files>\n"
                   "  <root>/ADEChallengeData2016/ade20k_panoptic_{{train,val}}/<PNG files>")
    data_option = ADE_ROOT_OPTION

    def __init__(
        self,
        root: str,
        augmentation: Augmentation = "ade",
        crop_size: int = 640,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        photometric: bool = True,
        test_size: int = 640,
        test_max_size: int = 2560,
        predict_images: str | None = None,
        batch_size: int = 2,
        eval_batch_size: int = 1,
        num_workers: int = 4,
    ) -> None:
        if not Path(root).is_dir():
            raise self._data_not_found(f"ADE20K root folder {root}")
        base = Path(root) / "ADEChallengeData2016"
        self.dataset_root = base
        super().__init__(
            train_json=str(base / "ade20k_panoptic_train.json"),
            train_images=str(base / "images" / "training"),
            train_panoptic=str(base / "ade20k_panoptic_train"),
            val_json=str(base / "ade20k_panoptic_val.json"),
            val_images=str(base / "images" / "validation"),
            val_panoptic=str(base / "ade20k_panoptic_val"),
            augmentation=augmentation, crop_size=crop_size, min_scale=min_scale, max_scale=max_scale,
            photometric=photometric, test_size=test_size, test_max_size=test_max_size,
            predict_images=predict_images, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers,
        )

    def records(self, split: Literal["train", "val", "test"]) -> list[dict]:
        records = super().records(split)
        folder = _ADE_SPLITS[split]
        converted = self.dataset_root / "annotations_detectron2" / folder
        raw = self.dataset_root / "annotations" / folder
        if converted.is_dir():
            semantic_dir, label_format = converted, "detectron2"
        elif raw.is_dir():
            semantic_dir, label_format = raw, "ade"
        else:
            raise FileNotFoundError(
                f"ADE20K panoptic needs the semantic annotations for its mIoU: neither {converted} nor {raw} exists"
            )
        for record in records:
            record["sem_seg_file_name"] = str(semantic_dir / Path(record["pan_seg_file_name"]).name)
            record["sem_seg_format"] = label_format
        return records

"""ImageFolder classification data (ImageNet or any ``root/<split>/<class>/*`` dataset).

Training augmentation follows the Swin/FocalNet recipe (RandomResizedCrop, flip, RandAugment,
random erasing; colour jitter only when RandAugment is off, as in timm) written with
``torchvision.transforms.v2``; evaluation resizes to ``image_size / eval_crop_ratio`` and centre-crops.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Literal

import torch
from torchvision.transforms import v2

from datamodules.demo_shapes import ensure_demo_shapes
from datamodules.image_io import (
    EmptyDatasetError,
    ImageFilesDataset,
    OnError,
    SafeImageFolder,
    collate_skip_unreadable,
    find_class_folders,
    missing_data_message,
)
from datamodules.loading import GuardedLoader, ResumableDataModule

__all__ = ["DemoShapesDataModule", "ImageNetDataModule", "IMAGENET_MEAN", "IMAGENET_STD"]

log = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
Interpolation = Literal["nearest", "bilinear", "bicubic"]
#: the folder tree :class:`ImageNetDataModule` reads (named in its missing-data errors)
IMAGE_FOLDER_LAYOUT = "  <root>/train/<class_name>/<image files>\n  <root>/val/<class_name>/<image files>"
ROOT_OPTION = "--data.init_args.root to the folder holding the split folders (train/, val/)"


def build_train_transform(
    image_size: int,
    interpolation: Interpolation = "bicubic",
    crop_scale: tuple[float, float] = (0.08, 1.0),
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip_prob: float = 0.5,
    randaugment_num_ops: int = 2,
    randaugment_magnitude: int = 9,
    color_jitter: float = 0.4,
    random_erasing_prob: float = 0.25,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL image -> normalised float tensor (3, image_size, image_size) with training augmentation.

    RandAugment is disabled when ``randaugment_num_ops`` or ``randaugment_magnitude`` is 0; colour
    jitter (brightness/contrast/saturation ``color_jitter``) applies only when RandAugment is off.
    Random erasing fills the erased box with per-pixel normal noise.
    """
    mode = v2.InterpolationMode(interpolation)
    steps: list = [v2.RandomResizedCrop(image_size, scale=crop_scale, ratio=crop_ratio, interpolation=mode, antialias=True)]
    if hflip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(hflip_prob))
    if randaugment_num_ops > 0 and randaugment_magnitude > 0:
        steps.append(v2.RandAugment(num_ops=randaugment_num_ops, magnitude=randaugment_magnitude, interpolation=mode))
    elif color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter))
    steps += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if random_erasing_prob > 0:
        steps.append(v2.RandomErasing(p=random_erasing_prob, value="random"))
    return v2.Compose(steps)


def build_eval_transform(
    image_size: int,
    interpolation: Interpolation = "bicubic",
    crop_ratio: float = 224 / 256,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> v2.Compose:
    """PIL image -> normalised float tensor: resize the short side to ``image_size / crop_ratio``, centre crop."""
    if not 0 < crop_ratio <= 1:
        raise ValueError(f"eval crop ratio must be in (0, 1], got {crop_ratio}")
    resize = int(round(image_size / crop_ratio))
    return v2.Compose([
        v2.Resize(resize, interpolation=v2.InterpolationMode(interpolation), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean, std),
    ])


class ImageNetDataModule(ResumableDataModule):
    """Classification data from an ImageFolder tree ``root/{train_split,val_split}/<class>/<images>``.

    ``num_classes`` and ``class_names`` are known right after construction (read from the class
    folders of the train split, or of the val split when there is no train split), so a CLI can link
    ``data.num_classes`` to the model. Batches are ``(images float32 (B,3,S,S), targets int64 (B,))``;
    predict batches are ``(images, paths)``.

    Args:
        root: dataset root.
        image_size: side of the square network input.
        batch_size: per-device batch size.
        num_workers: DataLoader workers.
        pin_memory: pin host memory of batches.
        persistent_workers: keep workers alive between epochs (only when ``num_workers > 0``).
        interpolation: resampling used by all resizes.
        eval_crop_ratio: evaluation centre-crop ratio (resize to ``image_size / eval_crop_ratio`` first).
        train_crop_scale: area range of RandomResizedCrop.
        train_crop_ratio: aspect-ratio range of RandomResizedCrop.
        hflip_prob: horizontal flip probability.
        randaugment_num_ops: RandAugment operations per image (0 disables RandAugment).
        randaugment_magnitude: RandAugment magnitude (0 disables RandAugment).
        color_jitter: brightness/contrast/saturation jitter, used only when RandAugment is disabled (0 disables).
        random_erasing_prob: probability of random erasing (0 disables).
        mean: normalisation mean (RGB, 0-1 scale).
        std: normalisation std (RGB, 0-1 scale).
        on_corrupt_image: ``"raise"`` or ``"skip"`` (counted warning) for unreadable images.
        train_split: sub-folder of the training split.
        val_split: sub-folder of the validation split.
        test_split: sub-folder used by ``test`` (``None``: no test data).
        predict_root: folder of images (searched recursively) used by ``predict``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        interpolation: Interpolation = "bicubic",
        eval_crop_ratio: float = 224 / 256,
        train_crop_scale: tuple[float, float] = (0.08, 1.0),
        train_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        randaugment_num_ops: int = 2,
        randaugment_magnitude: int = 9,
        color_jitter: float = 0.4,
        random_erasing_prob: float = 0.25,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        on_corrupt_image: OnError = "raise",
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = "val",
        predict_root: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if on_corrupt_image not in ("raise", "skip"):
            raise ValueError(f"on_corrupt_image must be 'raise' or 'skip', got {on_corrupt_image!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise EmptyDatasetError(missing_data_message(f"dataset root {self.root}", IMAGE_FOLDER_LAYOUT, ROOT_OPTION))
        self.image_size = image_size
        self.batch_size = batch_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.on_corrupt_image = on_corrupt_image
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.predict_root = predict_root

        label_split = self.root / train_split
        if not label_split.is_dir():
            label_split = self.root / val_split
            if not label_split.is_dir():
                raise EmptyDatasetError(missing_data_message(
                    f"split folder {self.root / train_split} (or {self.root / val_split})", IMAGE_FOLDER_LAYOUT,
                    f"{ROOT_OPTION}, or --data.init_args.train_split / val_split",
                ))
        self._class_names = find_class_folders(label_split)
        self.class_to_idx = {name: index for index, name in enumerate(self._class_names)}

        self.train_transform = build_train_transform(
            image_size, interpolation, train_crop_scale, train_crop_ratio, hflip_prob,
            randaugment_num_ops, randaugment_magnitude, color_jitter, random_erasing_prob, mean, std,
        )
        if randaugment_num_ops > 0 and randaugment_magnitude > 0 and color_jitter > 0:
            log.info("color_jitter=%s is not applied because RandAugment is enabled (timm/Swin recipe)", color_jitter)
        self.eval_transform = build_eval_transform(image_size, interpolation, eval_crop_ratio, mean, std)
        self.train_dataset: SafeImageFolder | None = None
        self.val_dataset: SafeImageFolder | None = None
        self.test_dataset: SafeImageFolder | None = None
        self.predict_dataset: ImageFilesDataset | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (class folders of the train split)."""
        return len(self._class_names)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order."""
        return list(self._class_names)

    def _split_dataset(self, split: str, train: bool) -> SafeImageFolder:
        split_dir = self.root / split
        if not split_dir.is_dir():
            raise EmptyDatasetError(missing_data_message(
                f"split folder {split_dir}", IMAGE_FOLDER_LAYOUT, f"{ROOT_OPTION}, or --data.init_args.<split>_split"
            ))
        dataset = SafeImageFolder(
            split_dir,
            transform=self.train_transform if train else self.eval_transform,
            class_to_idx=self.class_to_idx,
            on_error=self.on_corrupt_image,
        )
        missing = sorted(set(self._class_names) - set(find_class_folders(split_dir)))
        if missing:
            log.warning("split %s has no folder for %d class(es): %s", split_dir, len(missing), missing)
        return dataset

    def setup(self, stage: str) -> None:
        """Scan the split folders needed by ``stage`` (errors name the faulty folder)."""
        if stage == "fit":
            self.train_dataset = self.train_dataset or self._split_dataset(self.train_split, train=True)
        if stage in ("fit", "validate"):
            self.val_dataset = self.val_dataset or self._split_dataset(self.val_split, train=False)
        if stage == "test":
            if self.test_split is None:
                raise ValueError("test_split is None: this datamodule has no test data")
            self.test_dataset = self.test_dataset or self._split_dataset(self.test_split, train=False)
        if stage == "predict":
            if self.predict_root is None:
                raise ValueError("predict_root is not set: give the folder of images to predict on")
            self.predict_dataset = self.predict_dataset or ImageFilesDataset(
                self.predict_root, transform=self.eval_transform, on_error=self.on_corrupt_image
            )

    def _loader(self, dataset, name: str, train: bool = False, collate_fn=None) -> GuardedLoader:
        return self.loader(
            dataset, name, self.batch_size, train=train,
            # drop the ragged last training batch unless the dataset is smaller than one batch
            drop_last=train and len(dataset) > self.batch_size,
            collate_fn=collate_fn,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
        )

    def train_dataloader(self) -> GuardedLoader:
        if self.train_dataset is None:
            self.setup("fit")
        return self._loader(self.train_dataset, "train_dataloader", train=True)

    def val_dataloader(self) -> GuardedLoader:
        if self.val_dataset is None:
            self.setup("validate")
        return self._loader(self.val_dataset, "val_dataloader")

    def test_dataloader(self) -> GuardedLoader:
        if self.test_dataset is None:
            self.setup("test")
        return self._loader(self.test_dataset, "test_dataloader")

    def predict_dataloader(self) -> GuardedLoader:
        if self.predict_dataset is None:
            self.setup("predict")
        collate = functools.partial(collate_skip_unreadable, empty_image_shape=(3, self.image_size, self.image_size))
        return self._loader(self.predict_dataset, "predict_dataloader", collate_fn=collate)


class DemoShapesDataModule(ImageNetDataModule):
    """The generated 5-class demo shapes classification set (64 px), created on first use.

    ``root`` is the demo dataset root (see :func:`datamodules.demo_shapes.ensure_demo_shapes`);
    images are read from ``root/classification``. Augmentation is light: mild crops and flips, colour
    jitter, no RandAugment or erasing (which would destroy 64 px shapes).
    """

    def __init__(
        self,
        root: str = "data/demo_shapes",
        image_size: int = 64,
        batch_size: int = 32,
        num_workers: int = 2,
        pin_memory: bool = False,
        persistent_workers: bool = True,
        interpolation: Interpolation = "bilinear",
        eval_crop_ratio: float = 1.0,
        train_crop_scale: tuple[float, float] = (0.7, 1.0),
        train_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip_prob: float = 0.5,
        randaugment_num_ops: int = 0,
        randaugment_magnitude: int = 0,
        color_jitter: float = 0.3,
        random_erasing_prob: float = 0.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        on_corrupt_image: OnError = "raise",
        test_split: str | None = "val",
        predict_root: str | None = None,
        seed: int = 0,
    ) -> None:
        self.demo_root = ensure_demo_shapes(root, seed=seed)
        super().__init__(
            root=str(self.demo_root / "classification"),
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            interpolation=interpolation,
            eval_crop_ratio=eval_crop_ratio,
            train_crop_scale=train_crop_scale,
            train_crop_ratio=train_crop_ratio,
            hflip_prob=hflip_prob,
            randaugment_num_ops=randaugment_num_ops,
            randaugment_magnitude=randaugment_magnitude,
            color_jitter=color_jitter,
            random_erasing_prob=random_erasing_prob,
            mean=mean,
            std=std,
            on_corrupt_image=on_corrupt_image,
            test_split=test_split,
            predict_root=predict_root,
        )
        # hparams must mirror this class's signature (the base class also recorded its split names)
        self.remove_ignored_hparams(["train_split", "val_split"])

"""Robust image reading, ImageFolder datasets and the ImageNet / demo-shapes datamodules."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from torchvision.transforms import v2

import datamodules.imagenet as imagenet_module
from datamodules.demo_shapes import DemoShapesSizes, ensure_demo_shapes
from datamodules.image_io import (
    EmptyDatasetError,
    ImageFilesDataset,
    ImageReadError,
    SafeImageFolder,
    SkippedImageWarning,
    collate_skip_unreadable,
    find_class_folders,
    read_image_rgb,
    read_image_tensor,
)
from datamodules.imagenet import DemoShapesDataModule, ImageNetDataModule
from datamodules.loading import DataLoadError

CLASSES = ("ant", "bee", "cat")


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rgb.convert(mode) if mode not in ("RGB", "I;16") else rgb
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(size[1], size[0]), dtype=np.uint16))
    image.save(path)
    return path


def make_image_folder(root: Path, splits: tuple[str, ...] = ("train", "val"), per_class: int = 3) -> Path:
    modes = ("RGB", "L", "RGBA", "P", "CMYK")
    for split in splits:
        for class_index, name in enumerate(CLASSES):
            for index in range(per_class):
                mode = modes[(class_index + index) % len(modes)]
                suffix = ".jpg" if mode in ("RGB", "L", "CMYK") else ".png"
                write_image(root / split / name / f"{index}{suffix}", mode, seed=class_index * 100 + index)
    return root


def corrupt_jpeg(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4)
    return path


def truncated_png(path: Path) -> Path:
    write_image(path, "RGB", size=(64, 64))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


# --------------------------------------------------------------------------------------------
# image reading
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "CMYK", "I;16", "1", "LA"])
def test_every_mode_is_read_as_8bit_rgb(tmp_path: Path, mode: str) -> None:
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = write_image(tmp_path / f"image{suffix}", mode, size=(20, 10))
    image = read_image_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 10)
    tensor = read_image_tensor(path)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 10, 20)
    if mode in ("L", "I;16", "1"):
        assert torch.equal(tensor[0], tensor[1]) and torch.equal(tensor[1], tensor[2])


def test_alpha_is_composited_and_high_depth_is_rescaled(tmp_path: Path) -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    pixels = np.asarray(read_image_rgb(tmp_path / "alpha.png"))
    assert pixels[0, 0].tolist() == [200, 0, 0]
    assert pixels[3, 3].tolist() == [255, 255, 255]
    assert np.asarray(read_image_rgb(tmp_path / "alpha.png", alpha_background=(0, 0, 0)))[3, 3].tolist() == [0, 0, 0]

    deep = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.asarray(read_image_rgb(tmp_path / "deep.png"))[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (30, 10), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert read_image_rgb(tmp_path / "rotated.jpg").size == (10, 30)
    assert read_image_rgb(tmp_path / "rotated.jpg", exif_transpose=False).size == (30, 10)


@pytest.mark.parametrize("make_bad", [corrupt_jpeg, truncated_png, lambda p: p])
def test_unreadable_files_raise_an_error_naming_them(tmp_path: Path, make_bad) -> None:
    path = make_bad(tmp_path / "bad_file.png")
    with pytest.raises(ImageReadError, match="bad_file.png") as caught:
        read_image_rgb(path)
    assert isinstance(caught.value, OSError) and isinstance(caught.value, ValueError)
    assert caught.value.path == str(path)


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
def test_safe_image_folder_raise_and_skip_modes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", splits=("train",))
    bad_jpeg = corrupt_jpeg(root / "train" / "bee" / "0_corrupt.jpg")
    bad_png = truncated_png(root / "train" / "cat" / "0_truncated.png")
    (root / "train" / "cat" / "readme.txt").write_text("not an image")

    with pytest.warns(UserWarning, match=r"ignored 1 non-image file"):
        strict = SafeImageFolder(root / "train")
    assert strict.classes == list(CLASSES) and len(strict) == 3 * 3 + 2
    bad_index = [path for path, _ in strict.samples].index(str(bad_jpeg))
    with pytest.raises(ImageReadError, match="0_corrupt.jpg"):
        strict[bad_index]

    with pytest.warns(UserWarning, match="non-image"):
        lenient = SafeImageFolder(root / "train", transform=v2.Compose([v2.ToImage()]), on_error="skip")
    with pytest.warns(SkippedImageWarning, match=r"\(1 skipped so far.*0_corrupt.jpg"):
        image, target = lenient[bad_index]
    assert target == lenient.targets[bad_index + 1] and image.shape[0] == 3  # the next readable sample
    with pytest.warns(SkippedImageWarning, match=r"\(2 skipped so far.*0_truncated.png"):
        images = [lenient[i] for i in range(len(lenient))]
    assert len(images) == len(lenient)
    assert lenient.skipped_files == [str(bad_jpeg), str(bad_png)]


def test_image_files_dataset_for_prediction(tmp_path: Path) -> None:
    folder = tmp_path / "to_predict"
    for index, mode in enumerate(("RGB", "L", "RGBA")):
        write_image(folder / f"{index}.png", mode)
    corrupt_jpeg(folder / "nested" / "broken.jpg")
    transform = v2.Compose([v2.ToImage(), v2.Resize((8, 8)), v2.ToDtype(torch.float32, scale=True)])

    with pytest.raises(ImageReadError, match="broken.jpg"):
        ImageFilesDataset(folder, transform)[3]
    dataset = ImageFilesDataset(folder, transform, on_error="skip")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=4,
        collate_fn=functools.partial(collate_skip_unreadable, empty_image_shape=(3, 8, 8)),
    )
    with pytest.warns(SkippedImageWarning, match="broken.jpg"):
        (images, paths), = list(loader)
    assert images.shape == (3, 3, 8, 8) and [Path(p).name for p in paths] == ["0.png", "1.png", "2.png"]
    assert collate_skip_unreadable([None, None], empty_image_shape=(3, 8, 8))[0].shape == (0, 3, 8, 8)
    with pytest.raises(EmptyDatasetError, match="empty_folder"):
        ImageFilesDataset((tmp_path / "empty_folder").mkdir() or tmp_path / "empty_folder")


# --------------------------------------------------------------------------------------------
# ImageNetDataModule
# --------------------------------------------------------------------------------------------
def small_datamodule(root: Path, **overrides) -> ImageNetDataModule:
    settings = dict(root=str(root), image_size=32, batch_size=4, num_workers=0, persistent_workers=False)
    return ImageNetDataModule(**{**settings, **overrides})


def test_batches_have_the_expected_shapes_and_types(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    dm = small_datamodule(root, predict_root=str(root / "val"))
    assert dm.num_classes == 3 and dm.class_names == list(CLASSES)  # before setup

    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and targets.min() >= 0 and targets.max() < 3
    assert len(dm.train_dataloader()) == 12 // 4  # complete batches only
    images, targets = next(iter(dm.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and targets.tolist() == [0, 0, 0, 0]
    dm.setup("test")
    assert sum(len(t) for _, t in dm.test_dataloader()) == 12
    dm.setup("predict")
    images, paths = next(iter(dm.predict_dataloader()))
    assert images.shape == (4, 3, 32, 32) and Path(paths[0]).parent.name == "ant"


def test_transforms_follow_the_configuration(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=1)
    dm = small_datamodule(root, random_erasing_prob=0.25)
    kinds = [type(t) for t in dm.train_transform.transforms]
    assert v2.RandAugment in kinds and v2.ColorJitter not in kinds and v2.RandomErasing in kinds
    assert kinds[0] is v2.RandomResizedCrop
    assert dm.train_transform.transforms[0].interpolation == v2.InterpolationMode.BICUBIC

    plain = small_datamodule(root, randaugment_num_ops=0, random_erasing_prob=0, hflip_prob=0, color_jitter=0.4)
    kinds = [type(t) for t in plain.train_transform.transforms]
    assert v2.RandAugment not in kinds and v2.ColorJitter in kinds
    assert v2.RandomErasing not in kinds and v2.RandomHorizontalFlip not in kinds

    resize, crop = dm.eval_transform.transforms[:2]
    assert resize.size == [round(32 * 256 / 224)] and crop.size == (32, 32)
    wide = Image.new("RGB", (100, 50))
    assert dm.eval_transform(wide).shape == (3, 32, 32)


def test_missing_and_empty_folders_are_reported_before_training(tmp_path: Path) -> None:
    with pytest.raises(EmptyDatasetError, match="nowhere"):
        small_datamodule(tmp_path / "nowhere")
    (tmp_path / "no_splits").mkdir()
    with pytest.raises(EmptyDatasetError, match="no_splits/train"):
        small_datamodule(tmp_path / "no_splits")

    root = make_image_folder(tmp_path / "data", per_class=1)
    (root / "train" / "dog").mkdir()
    dm = small_datamodule(root)
    with pytest.raises(EmptyDatasetError, match=r"class folder .*train/dog contains no image files"):
        dm.setup("fit")

    val_only = make_image_folder(tmp_path / "val_only", splits=("val",), per_class=1)
    dm = small_datamodule(val_only)
    assert dm.num_classes == 3  # labels from the val split when there is no train split
    dm.setup("validate")
    with pytest.raises(EmptyDatasetError, match="val_only/train"):
        dm.setup("fit")

    extra = make_image_folder(tmp_path / "extra", per_class=1)
    write_image(extra / "val" / "zebra" / "0.jpg")
    with pytest.raises(EmptyDatasetError, match=r"\['zebra'\]"):
        small_datamodule(extra).setup("fit")
    with pytest.raises(ValueError, match="predict_root"):
        small_datamodule(extra).setup("predict")


def test_corrupt_images_raise_or_are_skipped_by_the_loaders(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    corrupt_jpeg(root / "val" / "ant" / "9_corrupt.jpg")
    strict = small_datamodule(root)
    strict.setup("validate")
    with pytest.raises(DataLoadError, match=r"val_dataloader batch \d+: .*9_corrupt.jpg\): ImageReadError"):
        list(strict.val_dataloader())

    lenient = small_datamodule(root, on_corrupt_image="skip")
    lenient.setup("validate")
    with pytest.warns(SkippedImageWarning, match="9_corrupt.jpg"):
        batches = list(lenient.val_dataloader())
    assert sum(len(targets) for _, targets in batches) == 13
    assert lenient.val_dataset.skipped_files == [str(root / "val" / "ant" / "9_corrupt.jpg")]


class TinyClassifier(LightningModule):
    """Smallest model accepting ``num_classes`` from the datamodule, for the CLI test."""

    def __init__(self, num_classes: int = 1000, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=4), torch.nn.AdaptiveAvgPool2d(1),
                                       torch.nn.Flatten(), torch.nn.Linear(8, num_classes))

    def training_step(self, batch, batch_idx):
        images, targets = batch
        return torch.nn.functional.cross_entropy(self.net(images), targets)

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(images), targets))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


class LinkingCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")


def test_cli_configures_the_datamodule_and_links_num_classes(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "data", per_class=4)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"data:\n  root: {root}\n  image_size: 32\n  batch_size: 4\n  num_workers: 0\n"
        "  persistent_workers: false\n  interpolation: bilinear\n  train_crop_scale: [0.5, 1.0]\n"
        "  randaugment_num_ops: 1\n  mean: [0.5, 0.5, 0.5]\n  std: [0.25, 0.25, 0.25]\n"
        "trainer:\n  max_steps: 2\n  limit_val_batches: 2\n  logger: false\n  enable_checkpointing: false\n"
        "  enable_progress_bar: false\n  enable_model_summary: false\n  accelerator: cpu\n"
        f"  default_root_dir: {tmp_path / 'runs'}\n"
    )
    cli = LinkingCLI(TinyClassifier, ImageNetDataModule, run=False, args=["--config", str(config)])
    assert cli.model.hparams.num_classes == 3
    assert cli.datamodule.train_transform.transforms[0].scale == (0.5, 1.0)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 2


# --------------------------------------------------------------------------------------------
# DemoShapesDataModule
# --------------------------------------------------------------------------------------------
def test_demo_shapes_datamodule_writes_its_data_in_prepare_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = DemoShapesSizes(classification_train_per_class=8, classification_val_per_class=2, scenes_train=1, scenes_val=1)
    monkeypatch.setattr(imagenet_module, "ensure_demo_shapes", functools.partial(ensure_demo_shapes, sizes=small))
    dm = DemoShapesDataModule(root=str(tmp_path / "shapes"), num_workers=0, batch_size=8)
    assert dm.num_classes == 5 and dm.class_names == ["circle", "cross", "square", "star", "triangle"]
    assert not (tmp_path / "shapes").exists()  # nothing written when only configured
    dm.prepare_data()
    assert (tmp_path / "shapes" / "coco" / "annotations" / "instances_train2017.json").is_file()
    assert find_class_folders(tmp_path / "shapes" / "classification" / "train") == dm.class_names
    assert dict(dm.hparams) == {**dict(dm.hparams), "root": str(tmp_path / "shapes"), "image_size": 64, "seed": 0}
    assert set(dm.hparams) <= set(inspect.signature(DemoShapesDataModule).parameters)
    kinds = [type(t) for t in dm.train_transform.transforms]
    assert v2.RandAugment not in kinds and v2.RandomErasing not in kinds
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 64, 64) and targets.dtype == torch.int64
    assert len(dm.train_dataset) == 40 and len(dm.val_dataset) == 10

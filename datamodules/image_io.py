"""Robust image reading shared by all datamodules.

* :func:`read_image_rgb` decodes any file PIL understands to an 8-bit RGB image (grayscale, 16-bit,
  CMYK, palette and alpha images are converted; EXIF orientation is applied) and turns every
  failure into an :class:`ImageReadError` naming the file.
* :class:`SafeImageFolder` is an ImageFolder-style classification dataset whose scan errors name
  the offending folder and whose unreadable images either raise or are skipped with a counted
  warning (never silently).
* :class:`ImageFilesDataset` lists the images of a folder for ``predict`` and yields
  ``(image, path)``; with ``on_error="skip"`` unreadable files are dropped by
  :func:`collate_skip_unreadable` (counted warning).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate
from torchvision.transforms.v2 import functional as TF

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataNotFoundError",
    "EmptyDatasetError",
    "ImageFilesDataset",
    "ImageReadError",
    "OnError",
    "SafeImageFolder",
    "SkippedImageWarning",
    "collate_skip_unreadable",
    "find_class_folders",
    "list_image_files",
    "missing_data_message",
    "predict_image_files",
    "read_image_rgb",
    "read_image_tensor",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".pbm", ".bmp", ".tif", ".tiff", ".webp", ".gif")
OnError = Literal["raise", "skip"]


class ImageReadError(OSError, ValueError):
    """An image file could not be read or decoded; the message names the file."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"cannot read image {os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class DataNotFoundError(FileNotFoundError):
    """Data a datamodule needs is not there; the message says what is missing, the layout expected
    and the option to set (``cli.py`` prints it without a traceback)."""


def missing_data_message(what: str, layout: str, option: str) -> str:
    """The text of a :class:`DataNotFoundError`: ``what`` is missing (e.g. ``"COCO annotation file
    /x/y.json"``), the ``layout`` expected (indented lines) and the command-line ``option`` to set."""
    return f"Data not found: {what}.\nExpected layout:\n{layout}\nSet {option}."


class EmptyDatasetError(DataNotFoundError):
    """A dataset folder is missing, has no class folders, or a class folder has no images."""


class SkippedImageWarning(UserWarning):
    """Emitted once per unreadable image skipped with ``on_error="skip"``."""


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
def _high_depth_to_uint8(image: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float grayscale images to 8 bits (PIL would clip them)."""
    array = np.asarray(image)
    if image.mode == "F":
        scale = 255.0 if float(np.nanmax(array, initial=0.0)) <= 1.0 else 1.0
        array = np.nan_to_num(array.astype(np.float64) * scale)
    elif image.mode.startswith("I;16"):
        array = array.astype(np.float64) / 257.0
    else:  # "I": 32-bit signed ints, commonly holding 16-bit data
        peak = float(array.max(initial=0))
        array = array.astype(np.float64) / (1.0 if peak <= 255 else 257.0 if peak <= 65535 else peak / 255.0)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(image: Image.Image, alpha_background: tuple[int, int, int]) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _high_depth_to_uint8(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, alpha_background + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def read_image_rgb(
    path: str | os.PathLike,
    *,
    exif_transpose: bool = True,
    alpha_background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Fully decode ``path`` to an 8-bit RGB PIL image.

    Transparent pixels are composited over ``alpha_background``. Missing, unidentifiable,
    corrupt or truncated files raise :class:`ImageReadError` naming the file.
    """
    try:
        with Image.open(path) as opened:
            opened.load()  # decode now so truncation/corruption surfaces here
            image = ImageOps.exif_transpose(opened) if exif_transpose else opened
            return _to_rgb(image, alpha_background).copy()
    except ImageReadError:
        raise
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as error:
        raise ImageReadError(path, f"{type(error).__name__}: {error}") from error


def read_image_tensor(path: str | os.PathLike, **kwargs: Any) -> torch.Tensor:
    """Like :func:`read_image_rgb` but returns a ``uint8`` tensor of shape (3, H, W)."""
    return TF.pil_to_tensor(read_image_rgb(path, **kwargs))


# --------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------
def list_image_files(folder: str | os.PathLike, recursive: bool = True) -> tuple[list[Path], list[Path]]:
    """Sorted image files of ``folder`` and, separately, the other (non-hidden) files found."""
    folder = Path(folder)
    images: list[Path] = []
    others: list[Path] = []
    walker = os.walk(folder, followlinks=True) if recursive else [(str(folder), [], os.listdir(folder))]
    for directory, subdirs, files in walker:
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(directory) / name
            if name.startswith(".") or not path.is_file():
                continue
            (images if name.lower().endswith(IMAGE_EXTENSIONS) else others).append(path)
    return images, others


def predict_image_files(folder: str | os.PathLike, option: str = "--data.init_args.predict_images") -> list[Path]:
    """The image files under ``folder`` (recursively, sorted) for ``predict``; a :class:`DataNotFoundError`
    naming ``option`` when the folder is missing or holds no images."""
    folder = Path(folder)
    images, _ = list_image_files(folder) if folder.is_dir() else ([], [])
    if not images:
        state = "holds no image files" if folder.is_dir() else "does not exist"
        raise DataNotFoundError(f"predict image folder {folder} {state} ({', '.join(IMAGE_EXTENSIONS)}). "
                                f"Set {option} to a folder of images.")
    return images


def find_class_folders(split_dir: str | os.PathLike) -> list[str]:
    """Sorted names of the class sub-folders of an ImageFolder split; clear error when there are none."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise EmptyDatasetError(f"dataset folder {split_dir} does not exist")
    classes = sorted(entry.name for entry in os.scandir(split_dir) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise EmptyDatasetError(f"no class folders in {split_dir} (expected {split_dir}/<class_name>/<image files>)")
    return classes


def _warn_ignored(others: Sequence[Path], where: Path) -> None:
    if others:
        warnings.warn(
            f"ignored {len(others)} non-image file(s) under {where} (e.g. {others[0]}); "
            f"image extensions are {', '.join(IMAGE_EXTENSIONS)}",
            stacklevel=3,
        )


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------
class _SkipCounter:
    """Per-process record of skipped files, warning once per file with the running total."""

    def __init__(self) -> None:
        self.skipped: list[str] = []

    def record(self, error: ImageReadError) -> None:
        if error.path in self.skipped:
            return
        self.skipped.append(error.path)
        warnings.warn(
            f"skipping unreadable image ({len(self.skipped)} skipped so far in this process): {error}",
            SkippedImageWarning,
            stacklevel=3,
        )


class SafeImageFolder(Dataset):
    """ImageFolder-style dataset (``root/<class>/**/<image>``) returning ``(transform(image), target)``.

    Args:
        root: split folder holding one sub-folder per class.
        transform: applied to the RGB PIL image.
        class_to_idx: label mapping to use (e.g. the train split's for the val split); by default
            the sorted class folders of ``root``. Folders of ``root`` missing from it are an error.
        on_error: ``"raise"`` raises :class:`ImageReadError` for an unreadable image; ``"skip"``
            warns (counting skipped files, see :attr:`skipped_files`) and returns the next readable
            sample instead.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        class_to_idx: dict[str, int] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        self.transform = transform
        self.on_error = on_error
        folders = find_class_folders(self.root)
        if class_to_idx is None:
            class_to_idx = {name: index for index, name in enumerate(folders)}
        unknown = [name for name in folders if name not in class_to_idx]
        if unknown:
            raise EmptyDatasetError(
                f"class folder(s) {unknown} in {self.root} are not among the {len(class_to_idx)} known classes"
            )
        self.class_to_idx = dict(class_to_idx)
        self.classes = sorted(self.class_to_idx, key=self.class_to_idx.__getitem__)
        self.samples: list[tuple[str, int]] = []
        ignored: list[Path] = []
        for name in folders:
            images, others = list_image_files(self.root / name)
            if not images:
                raise EmptyDatasetError(f"class folder {self.root / name} contains no image files")
            ignored.extend(others)
            self.samples.extend((os.fspath(path), self.class_to_idx[name]) for path in images)
        _warn_ignored(ignored, self.root)
        self.targets = [target for _, target in self.samples]
        self._skips = _SkipCounter()

    @property
    def skipped_files(self) -> list[str]:
        """Files skipped so far by this process (workers keep their own lists)."""
        return list(self._skips.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for attempt in range(len(self.samples)):
            path, target = self.samples[(index + attempt) % len(self.samples)]
            try:
                image = read_image_rgb(path)
            except ImageReadError as error:
                if self.on_error == "raise":
                    raise
                self._skips.record(error)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise ImageReadError(self.root, "no readable image left in the dataset")


class ImageFilesDataset(Dataset):
    """The images of a folder (recursively, sorted) for prediction, yielding ``(image, path)``.

    With ``on_error="skip"`` an unreadable file yields ``None`` (after a counted warning); use
    :func:`collate_skip_unreadable` as the DataLoader's ``collate_fn`` to drop those entries.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable[[Image.Image], Any] | None = None,
        on_error: OnError = "raise",
    ) -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise EmptyDatasetError(f"prediction folder {self.root} does not exist")
        images, others = list_image_files(self.root)
        if not images:
            raise EmptyDatasetError(f"prediction folder {self.root} contains no image files")
        _warn_ignored(others, self.root)
        self.paths = [os.fspath(path) for path in images]
        self.transform = transform
        self.on_error = on_error
        self._skips = _SkipCounter()

    @property
    def skipped_files(self) -> list[str]:
        """Files skipped so far by this process (workers keep their own lists)."""
        return list(self._skips.skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, str] | None:
        path = self.paths[index]
        try:
            image = read_image_rgb(path)
        except ImageReadError as error:
            if self.on_error == "raise":
                raise
            self._skips.record(error)
            return None
        return (self.transform(image) if self.transform is not None else image), path


def collate_skip_unreadable(batch: list[Any], empty_image_shape: Sequence[int] = (3, 0, 0)) -> Any:
    """``default_collate`` after dropping the ``None`` entries of skipped images.

    A batch made only of unreadable files becomes ``(zeros(0, *empty_image_shape), [])`` (bind the
    shape of transformed images with ``functools.partial``).
    """
    kept = [item for item in batch if item is not None]
    if not kept:
        return torch.zeros(0, *empty_image_shape), []
    return default_collate(kept)

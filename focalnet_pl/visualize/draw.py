"""Drawing helpers: top-5 labels under an image, heat-map overlays, tensors back to pictures."""
from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: pictures are scaled so that their short side is at least this many pixels
MIN_SIDE = 224


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def load_picture(path: str | os.PathLike) -> Image.Image:
    """An image file as RGB (EXIF orientation applied, alpha over white)."""
    with Image.open(path) as opened:
        opened.load()
        image = ImageOps.exif_transpose(opened)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        return image.convert("RGB")


def tensor_to_picture(image: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                      std: Sequence[float] = IMAGENET_STD) -> Image.Image:
    """A normalised (3, H, W) float tensor back to an RGB picture."""
    image = image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(array, mode="RGB")


def _upscaled(image: Image.Image, min_side: int = MIN_SIDE) -> Image.Image:
    short = min(image.size)
    if short >= min_side:
        return image
    scale = min_side / short
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BILINEAR)


def draw_top5(image: Image.Image, top5: Sequence[Mapping[str, Any]], truth: str | None = None) -> Image.Image:
    """``image`` (upscaled to a readable size) above a panel listing labels, scores and score bars."""
    image = _upscaled(image.convert("RGB"))
    line, pad = 22, 8
    rows = len(top5) + (1 if truth is not None else 0)
    width = max(image.width, 260)
    canvas = Image.new("RGB", (width, image.height + rows * line + 2 * pad), (255, 255, 255))
    canvas.paste(image, ((width - image.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    font = _font(15)
    y = image.height + pad
    if truth is not None:
        draw.text((pad, y), f"true: {truth}", fill=(0, 0, 0), font=font)
        y += line
    bar_x = width // 2 + 20
    bar_w = width - bar_x - pad
    for rank, entry in enumerate(top5):
        score = float(entry["score"])
        hit = truth is not None and entry["label"] == truth
        colour = (30, 140, 60) if hit or (truth is None and rank == 0) else (70, 90, 160)
        draw.text((pad, y), f"{rank + 1}. {entry['label']}", fill=(0, 0, 0), font=font)
        draw.rectangle((bar_x, y + 3, bar_x + bar_w, y + line - 5), outline=(200, 200, 200))
        draw.rectangle((bar_x, y + 3, bar_x + max(1, round(bar_w * score)), y + line - 5), fill=colour)
        draw.text((bar_x - 44, y + 1), f"{score:.2f}", fill=(0, 0, 0), font=font)
        y += line
    return canvas


def save_picture(picture: Image.Image, folder: str | os.PathLike, source: str | os.PathLike) -> Path:
    """Save as ``folder/<stem of source>-<hash of source path>.png`` (unique per source file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(source).stem}-{zlib.crc32(str(source).encode()):08x}.png"
    picture.save(path)
    return path


def _colormap(values: np.ndarray, name: str) -> np.ndarray:
    import matplotlib

    return (matplotlib.colormaps[name](values)[..., :3] * 255).astype(np.uint8)


def overlay_heatmap(image: Image.Image, heat: np.ndarray, alpha: float = 0.55, cmap: str = "jet",
                    value_range: tuple[float, float] | None = None) -> Image.Image:
    """``heat`` (h, w), resized to the image and colour-mapped, blended over ``image``.

    Values are scaled to [0, 1] with ``value_range`` (default: the map's own min and max).
    """
    heat = np.asarray(heat, dtype=np.float64)
    low, high = value_range if value_range is not None else (float(np.nanmin(heat)), float(np.nanmax(heat)))
    scaled = np.clip((heat - low) / (high - low), 0, 1) if high > low else np.zeros_like(heat)
    resized = Image.fromarray((scaled * 255).astype(np.uint8), mode="L").resize(image.size, Image.Resampling.BILINEAR)
    coloured = Image.fromarray(_colormap(np.asarray(resized) / 255.0, cmap), mode="RGB")
    return Image.blend(image.convert("RGB"), coloured, alpha)


def draw_detectron2_output(image_rgb: np.ndarray, output: Mapping[str, Any], metadata: Any,
                           score_threshold: float = 0.5, overlay_alpha: float = 0.5) -> np.ndarray:
    """A detectron2 model's output drawn on its (H, W, 3) RGB image by detectron2's ``Visualizer`` (needs
    OpenCV): the panoptic segments, else the semantic map, else the instances scoring ``score_threshold``
    or more; ``metadata`` names (and colours) the classes."""
    from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: PLC0415 (OpenCV, detectron2)

    visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    if "panoptic_seg" in output:
        segment_map, segments = output["panoptic_seg"]
        drawn = visualizer.draw_panoptic_seg(segment_map.cpu(), segments, alpha=overlay_alpha)
    elif "sem_seg" in output:
        drawn = visualizer.draw_sem_seg(output["sem_seg"].argmax(0).cpu(), alpha=overlay_alpha)
    else:
        instances = output["instances"].to("cpu")
        drawn = visualizer.draw_instance_predictions(instances[instances.scores >= score_threshold])
    return drawn.get_image()

"""Focal modulation maps (paper Figs. 5-6): gates per focal level and modulator magnitude, per stage.

For the last block of every stage, the gates ``G^l`` (one map per focal level plus the global level)
and the modulator magnitude (``|m|`` averaged over channels) are overlaid on the image.

    python cli.py modulation-maps --config configs/demo/classification_shapes.yaml \\
        --ckpt_path runs/.../last.ckpt --images data/demo_shapes/classification/val/star --output maps/
    python cli.py modulation-maps --variant focalnet_tiny_srf --weights focalnet_tiny_srf.pth \\
        --images photo.jpg --output maps/

Per image ``<stem>``: ``<stem>/stage{s}_gate{l}.png``, ``<stem>/stage{s}_gate_global.png``,
``<stem>/stage{s}_modulator.png`` and a summary grid ``<stem>_modulation.png``.
"""
from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from datamodules.imagenet import IMAGENET_MEAN, IMAGENET_STD
from focalnet_pl.focalnet import FocalNet, create_focalnet
from focalnet_pl.visualize.draw import (
    _font,
    load_picture,
    overlay_heatmap,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


@dataclass
class StageMaps:
    """Maps of the last block of one stage, on that stage's token grid."""

    stage: int
    gates: np.ndarray  # (h, w, focal_level + 1); the last channel is the global level
    modulator_magnitude: np.ndarray  # (h, w)

    @property
    def focal_level(self) -> int:
        return self.gates.shape[-1] - 1


@torch.no_grad()
def modulation_maps(model: FocalNet, image: torch.Tensor) -> list[StageMaps]:
    """Run ``model`` on one normalised image ``(1, 3, H, W)`` and return the maps of each stage's last block."""
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"expected one image of shape (1, 3, H, W), got {tuple(image.shape)}")
    last_blocks = {}
    for stage, _, module in model.modulation_layers():
        last_blocks[stage] = module  # later blocks of the stage overwrite earlier ones
    was_training = model.training
    model.eval()
    for module in last_blocks.values():
        module.record_maps = True
    try:
        model.forward_features(image)
        maps = []
        for stage, module in sorted(last_blocks.items()):
            if module.last_gates is None:  # dense backbone stopping before this stage
                continue
            gates = module.last_gates[0].float().cpu().numpy()
            magnitude = module.last_modulator[0].float().abs().mean(-1).cpu().numpy()
            maps.append(StageMaps(stage, gates, magnitude))
        return maps
    finally:
        for module in last_blocks.values():
            module.record_maps = False
            module.last_gates = module.last_modulator = None
        model.train(was_training)


def prepare_image(path: str | Path, image_size: int, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> tuple[Image.Image, torch.Tensor]:
    """The image resized to ``image_size`` x ``image_size`` (as shown) and its normalised tensor."""
    picture = load_picture(path).resize((image_size, image_size), Image.Resampling.BICUBIC)
    tensor = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255.0
    tensor = (tensor - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return picture, tensor[None]


def _valid(grid: np.ndarray, picture: Image.Image, stride: int) -> np.ndarray:
    """Crop a token grid to the part that covers the image (inputs are padded to the stride)."""
    rows, cols = -(-picture.height // stride), -(-picture.width // stride)
    return grid[:rows, :cols]


def render_maps(picture: Image.Image, maps: Sequence[StageMaps], patch_size: int = 4,
                display_size: int = 160) -> tuple[dict[str, Image.Image], Image.Image]:
    """Individual overlays (``name -> picture``) and a labelled grid (rows: stages; columns: levels)."""
    shown = picture.resize((display_size, display_size), Image.Resampling.BICUBIC)
    overlays: dict[str, Image.Image] = {}
    max_level = max(stage_maps.focal_level for stage_maps in maps)
    # columns: image | gate 1 .. gate L (blank where a stage has fewer levels) | global gate | |modulator|
    headers = ["image"] + [f"gate {level + 1}" for level in range(max_level)] + ["global gate", "|modulator|"]
    rows: list[tuple[str, dict[int, Image.Image]]] = []
    for stage_maps in maps:
        stride = patch_size * 2 ** stage_maps.stage
        prefix = f"stage{stage_maps.stage + 1}"
        cells = {0: shown}
        for level in range(stage_maps.focal_level + 1):
            is_global = level == stage_maps.focal_level
            overlay = overlay_heatmap(shown, _valid(stage_maps.gates[..., level], picture, stride))
            overlays[f"{prefix}_gate_global" if is_global else f"{prefix}_gate{level + 1}"] = overlay
            cells[max_level + 1 if is_global else level + 1] = overlay
        overlay = overlay_heatmap(shown, _valid(stage_maps.modulator_magnitude, picture, stride), cmap="inferno")
        overlays[f"{prefix}_modulator"] = overlay
        cells[max_level + 2] = overlay
        rows.append((f"stage {stage_maps.stage + 1}", cells))
    label_w, header_h, gap = 70, 22, 4
    grid = Image.new("RGB", (label_w + len(headers) * (display_size + gap), header_h + len(rows) * (display_size + gap)),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = _font(14)
    for column, name in enumerate(headers):
        draw.text((label_w + column * (display_size + gap) + 4, 3), name, fill=(0, 0, 0), font=font)
    for r, (row_name, cells) in enumerate(rows):
        y = header_h + r * (display_size + gap)
        draw.text((6, y + display_size // 2 - 8), row_name, fill=(0, 0, 0), font=font)
        for column, cell in cells.items():
            grid.paste(cell, (label_w + column * (display_size + gap), y))
    return overlays, grid


def write_modulation_maps(model: FocalNet, images: Sequence[Path], output: str | Path, image_size: int = 224,
                          display_size: int = 160) -> list[Path]:
    """Write the overlays and the summary grid of every image; returns the grid files."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        picture, tensor = prepare_image(path, image_size)
        maps = modulation_maps(model, tensor.to(next(model.parameters()).device))
        overlays, grid = render_maps(picture, maps, model.cfg.patch_size, display_size)
        folder = output / path.stem
        folder.mkdir(exist_ok=True)
        for name, overlay in overlays.items():
            overlay.save(folder / f"{name}.png")
        grid_path = output / f"{path.stem}_modulation.png"
        grid.save(grid_path)
        written.append(grid_path)
        log.info("%s: %d stages -> %s", path, len(maps), grid_path)
    return written


def list_images(source: str | Path) -> list[Path]:
    """``source`` itself, or the image files under the folder ``source`` (sorted, recursive)."""
    source = Path(source)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise FileNotFoundError(f"--images: no such file or folder: {source}")
    images = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise FileNotFoundError(f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {source}")
    return images


def build_model(config: str | None, ckpt_path: str | None, weights: str | None, variant: str | None) -> FocalNet:
    """The FocalNet to visualise, from a task checkpoint, a weights file or a backbone export."""
    from focalnet_pl.export import (
        EXPORT_FORMAT,
        find_focalnet,
        focalnet_from_export,
        load_task,
        read_config,
    )
    from focalnet_pl.weights import read_safetensors_metadata

    if ckpt_path:
        if not config:
            raise ValueError("--ckpt_path needs --config (it names the task class)")
        return find_focalnet(load_task(read_config(config), ckpt_path))
    if not weights:
        raise ValueError("give --ckpt_path (with --config) or --weights")
    if weights.endswith(".safetensors") and Path(weights).is_file() \
            and read_safetensors_metadata(weights).get("format") == EXPORT_FORMAT and not variant:
        return focalnet_from_export(weights, features_only=True)
    overrides: dict = {}
    if config:
        init_args = (read_config(config).get("model") or {}).get("init_args") or {}
        variant = variant or init_args.get("variant")
        overrides = dict(init_args.get("model_overrides") or {})
    if not variant:
        raise ValueError("--weights needs --variant (or a --config naming model.init_args.variant)")
    return create_focalnet(variant, features_only=True, weights=weights, **overrides)


def main(argv: list[str]) -> None:
    """``cli.py modulation-maps``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="cli.py modulation-maps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="run config (task class, variant and model_overrides)")
    parser.add_argument("--ckpt_path", help="Lightning checkpoint of the task")
    parser.add_argument("--weights", help="FocalNet weights: official/timm/HF checkpoint or a focalnet-pl export")
    parser.add_argument("--variant", help="FocalNet variant, with --weights")
    parser.add_argument("--images", required=True, help="an image file or a folder of images")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--image_size", type=int, help="network input side (default: the config's data image_size or 224)")
    parser.add_argument("--display_size", type=int, default=160, help="side of each overlay in the grid")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    image_size = args.image_size
    if image_size is None and args.config:
        from focalnet_pl.export import read_config

        image_size = ((read_config(args.config).get("data") or {}).get("init_args") or {}).get("image_size")
    model = build_model(args.config, args.ckpt_path, args.weights, args.variant)
    written = write_modulation_maps(model, list_images(args.images), args.output, image_size or 224, args.display_size)
    print(f"wrote {len(written)} modulation grid(s) to {args.output}")

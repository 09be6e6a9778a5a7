"""Inference time with and without ``MODEL.MASK_PADDING`` (not a test).

Builds the model of each shipped config (FocalNet-T DINO, Mask R-CNN and Mask2Former by default; random
weights, 80 / 133 classes) and times inference on a batch of images of different sizes (padded to a
common size), with the padding masked (batch-size-independent results) and computed on (the official
models). The ratio masked / unmasked is the cost of the masking.

    python benchmarks/padding_mask.py                    # CPU, small images
    python benchmarks/padding_mask.py --device cuda --sizes 800x1088 640x800 800x600 512x704
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import yaml
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import focalnet_pl.d2.rcnn  # noqa: E402,F401  (registers the meta-architectures and their config keys)
import focalnet_pl.dino  # noqa: E402,F401
import focalnet_pl.mask2former  # noqa: E402,F401
from focalnet_pl.d2.config import NUM_CLASSES_KEYS  # noqa: E402
from focalnet_pl.tasks.detection import DetectionTask  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_CONFIGS = ("dino_focalnet_t.yaml", "mask_rcnn_focalnet_t_srf_1x.yaml", "mask2former_focalnet_t_coco_panoptic.yaml")


def build(config: Path, mask_padding: bool, device: torch.device) -> torch.nn.Module:
    recipe = yaml.safe_load(config.read_text())
    overrides = copy.deepcopy(recipe["model"]["init_args"]["detectron2"])
    model = overrides["MODEL"]
    model["MASK_PADDING"] = mask_padding
    model.get("FOCALNET", {})["WEIGHTS"] = ""
    model["WEIGHTS"] = ""
    architecture = model["META_ARCHITECTURE"]
    node, key = NUM_CLASSES_KEYS[architecture].removeprefix("MODEL.").rsplit(".", 1)
    model.setdefault(node, {})[key] = 133 if architecture == "Mask2Former" else 80
    torch.manual_seed(0)
    return DetectionTask(detectron2=overrides).model.to(device).eval()


def time_inference(model: torch.nn.Module, inputs: list[dict], device: torch.device) -> float:
    with torch.no_grad():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), help="config files under configs/")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", nargs="+", default=["256x352", "320x256", "224x320", "288x288"],
                        help="HxW of the images of the batch")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes]
    inputs = [{"image": torch.randint(0, 256, (3, h, w), generator=generator).float().to(device)} for h, w in sizes]
    rows = []
    for name in args.configs:
        models = {mask_padding: build(CONFIGS / name, mask_padding, device) for mask_padding in (False, True)}
        for model in models.values():  # warm-up (and the CPU fast paths' calibration)
            time_inference(model, inputs, device)
        runs: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.steps):  # interleaved, so that a change of load hits both alike
            for mask_padding, model in models.items():
                runs[mask_padding].append(time_inference(model, inputs, device))
        times = {mask_padding: min(values) for mask_padding, values in runs.items()}
        rows.append([name, f"{times[False]:.3f}", f"{times[True]:.3f}", f"{times[True] / times[False]:.2f}"])
    print(f"{device}, batch of {len(sizes)} images {' '.join(args.sizes)}, best of {args.steps} interleaved runs")
    print(tabulate(rows, headers=["config", "unmasked s", "masked s", "masked / unmasked"]))


if __name__ == "__main__":
    main()

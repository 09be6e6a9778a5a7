"""Mask R-CNN FocalNet train-step time and peak memory (not a test).

Builds the model of a Mask R-CNN config (default: FocalNet-T SRF 1x, full size, 80 classes) and
times full optimizer steps (forward, backward, AdamW) on synthetic images with 10 instances each.

    python benchmarks/mask_rcnn.py                       # CPU (or the GPU when there is one)
    python benchmarks/mask_rcnn.py --device cuda --precision bf16 --batch-size 2

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the growth of the process's peak
resident set size (``ru_maxrss``) over the built model during the steps (activations, gradients,
optimizer state and the allocator's caching).
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from focalnet_pl.tasks.detection import DetectionTask  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mask_rcnn_focalnet_t_srf_1x.yaml"


def synthetic_batch(batch_size: int, height: int, width: int, num_instances: int, generator: torch.Generator) -> list[dict]:
    """Images with random square instances (boxes, polygon masks, classes)."""
    batch = []
    for _ in range(batch_size):
        sizes = torch.randint(32, min(height, width) // 3, (num_instances,), generator=generator).float()
        x0 = torch.rand(num_instances, generator=generator) * (width - sizes)
        y0 = torch.rand(num_instances, generator=generator) * (height - sizes)
        boxes = torch.stack([x0, y0, x0 + sizes, y0 + sizes], dim=1)
        instances = Instances((height, width))
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.randint(0, 80, (num_instances,), generator=generator)
        instances.gt_masks = PolygonMasks([[[x1, y1, x2, y1, x2, y2, x1, y2]] for x1, y1, x2, y2 in boxes.tolist()])
        image = torch.randint(0, 256, (3, height, width), generator=generator, dtype=torch.uint8)
        batch.append({"image": image, "instances": instances, "height": height, "width": width})
    return batch


def peak_memory_mb(device: torch.device, rss_before_kb: int) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1088, help="800 x 1088: a 480 x 640 COCO image at 800 px")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--instances", type=int, default=10)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    recipe = yaml.safe_load(args.config.read_text())
    init_args = copy.deepcopy(recipe["model"]["init_args"])
    init_args["detectron2"]["MODEL"].setdefault("ROI_HEADS", {})["NUM_CLASSES"] = 80
    task = DetectionTask(**init_args)
    model = task.model.to(device).train()
    optimizer = torch.optim.AdamW(task.parameter_groups(), lr=init_args.get("lr", 1e-4))
    generator = torch.Generator().manual_seed(0)
    batch = synthetic_batch(args.batch_size, args.height, args.width, args.instances, generator)

    def step() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with EventStorage(0), torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            losses = model(batch)
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.warmup):
        step()
    times = [step() for _ in range(args.steps)]
    memory = peak_memory_mb(device, rss_before)

    params = sum(p.numel() for p in model.parameters()) / 1e6
    row = [
        args.config.stem, f"{params:.1f}M", device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        f"{torch.get_num_threads()}" if device.type == "cpu" else "-", args.precision,
        f"{args.batch_size} x {args.height}x{args.width}", f"{statistics.mean(times):.3f}",
        f"{statistics.stdev(times):.3f}" if len(times) > 1 else "-",
        f"{memory:.0f}" + ("" if device.type == "cuda" else " (RSS growth)"),
    ]
    headers = ["config", "params", "device", "threads", "precision", "batch", "step s", "std s", "peak MiB"]
    print(tabulate([row], headers=headers, tablefmt="pipe"))


if __name__ == "__main__":
    main()

"""Mask2Former-FocalNet training-step benchmark (not a test): time and peak memory per step.

One training step (forward with Hungarian matching and point-sampled losses on all 10 predictions,
backward, AdamW update) of the architectures of ``configs/mask2former_focalnet_{t,l}_*.yaml`` (random
init) on a batch of 512 px images, each with ``--masks`` random rectangular target masks.

Every measurement runs in a fresh subprocess; times are wall-clock per step and, because a shared
machine inflates wall time, also the process's CPU time per step. Peak memory: on CPU the peak resident
set size above the process's size just before the measured steps (model, optimizer state and inputs
already allocated by a warm-up step); on CUDA ``torch.cuda.max_memory_allocated`` above the allocation
before them.

    python benchmarks/segmentation.py                               # CPU: T and L, ADE20K semantic, 512 px
    python benchmarks/segmentation.py --device cuda --precision bf16 --batch-size 2
    python benchmarks/segmentation.py --configs mask2former_focalnet_t_coco_panoptic --sizes 512 1024
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch
from _isolated import run_isolated

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _batch(size: int, batch_size: int, num_masks: int, num_classes: int, generator: torch.Generator) -> list[dict]:
    from detectron2.structures import Instances

    batch = []
    for _ in range(batch_size):
        masks = torch.zeros(num_masks, size, size, dtype=torch.bool)
        for index in range(num_masks):
            top, left = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            height, width = torch.randint(size // 16, size // 2, (2,), generator=generator).tolist()
            masks[index, top : top + height, left : left + width] = True
        instances = Instances((size, size))
        instances.gt_masks = masks
        instances.gt_classes = torch.randint(0, num_classes, (num_masks,), generator=generator)
        image = torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8).float()
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


def train_step_worker(config_name: str, size: int, batch_size: int, num_masks: int, device_name: str,
                      precision: str, repeats: int, queue: mp.Queue) -> None:
    import yaml
    from detectron2.modeling import build_model

    from focalnet_pl.d2 import build_detectron2_cfg

    device = torch.device(device_name)
    config = yaml.safe_load((REPO / "configs" / f"{config_name}.yaml").read_text())
    detectron2 = config["model"]["init_args"]["detectron2"]
    detectron2["MODEL"]["DEVICE"] = device_name
    detectron2["MODEL"]["FOCALNET"]["WEIGHTS"] = ""
    num_classes = detectron2["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"]
    torch.manual_seed(0)
    model = build_model(build_detectron2_cfg(detectron2)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    batch = _batch(size, batch_size, num_masks, num_classes, torch.Generator().manual_seed(0))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = sum(model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (also allocates the optimizer state)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        step()
    _sync(device)
    elapsed = (time.perf_counter() - start) / repeats
    cpu = (time.process_time() - cpu_start) / repeats
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        # ru_maxrss is the lifetime peak (KiB on Linux); the fresh subprocess keeps it meaningful
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    queue.put({"s": elapsed, "cpu_s": cpu, "peak_mb": peak,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+",
                        default=["mask2former_focalnet_t_ade20k_semantic", "mask2former_focalnet_l_ade20k_semantic"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--masks", type=int, default=10, help="target masks per image")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    rows = []
    for config_name in args.configs:
        for size in args.sizes:
            result = run_isolated(train_step_worker, config_name, size, args.batch_size, args.masks, args.device, args.precision,
                                  args.repeats)
            rows.append({"config": config_name, "size": size, **result})
            print(f"done: {config_name} @ {size}px", file=sys.stderr, flush=True)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\nMask2Former train step, batch {args.batch_size} x {args.masks} masks, {args.precision}, {device}, "
          f"torch {torch.__version__}\n")
    print("| config | image | params (M) | step (s) | CPU time / step (s) | peak memory (MiB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['config']} | {row['size']} px | {row['params_m']:.1f} | {row['s']:.2f} | {row['cpu_s']:.2f} "
              f"| {row['peak_mb']:.0f} |")
    if args.json is not None:
        args.json.write_text(json.dumps({"device": device, "precision": args.precision, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

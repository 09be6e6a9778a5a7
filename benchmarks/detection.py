"""Detection benchmarks (not a test): multi-scale deformable attention and DINO-FocalNet-T train steps.

1. Deformable attention sampling, forward + backward: the library path
   (:func:`focalnet_pl.layers.ms_deform_attn_sample`, ``grid_sample``-based; a registered fused kernel on
   GPU when one is installed) against a naive reference that does the bilinear interpolation by hand
   (four corner gathers per sampling point, vectorised; a per-point Python loop is far too slow at these
   shapes). Shapes are those of DINO on a 512 px image: 4 levels at strides 8-64 (64x64 ... 8x8 = 5440
   tokens), 8 heads x 32 channels, 4 points, with the decoder's 900 + 200 queries and the encoder's
   5440 queries.
2. One DINO-FocalNet-T training step (configs/dino_focalnet_t.yaml architecture: hidden 256, 6 + 6
   layers, 900 queries, 100 denoising queries, random init) on one image at 512 and 800 px with 10 boxes.

Every measurement runs in a fresh subprocess; times are wall-clock per call and, because a shared
machine inflates wall time, also the process's CPU time per call. Peak memory: on CPU the peak resident set size above
the process's size just before the measured calls (inputs already allocated); on CUDA
``torch.cuda.max_memory_allocated`` above the allocation before them.

    python benchmarks/detection.py                 # CPU, everything
    python benchmarks/detection.py --device cuda   # GPU
    python benchmarks/detection.py --only attention --repeats 5
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTENTION_LEVELS = [(64, 64), (32, 32), (16, 16), (8, 8)]  # strides 8..64 of a 512 px image
ATTENTION_CASES = {"decoder (Q=1100)": 1100, "encoder (Q=5440)": 5440}


def naive_ms_deform_attn(value: torch.Tensor, spatial_shapes: torch.Tensor, locations: torch.Tensor,
                         weights: torch.Tensor) -> torch.Tensor:
    """Reference: bilinear interpolation written out (four corner gathers, zero outside the map)."""
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    output = value.new_zeros(batch, queries, heads, head_dim)
    start = 0
    for level, (height, width) in enumerate(spatial_shapes.tolist()):
        level_value = value[:, start:start + height * width].permute(0, 2, 1, 3)  # (B, heads, HW, D)
        start += height * width
        x = locations[:, :, :, level, :, 0] * width - 0.5  # (B, Q, heads, P)
        y = locations[:, :, :, level, :, 1] * height - 0.5
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                corner_weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < width) & (yi >= 0) & (yi < height)
                flat = (yi.clamp(0, height - 1) * width + xi.clamp(0, width - 1)).long()  # (B, Q, heads, P)
                index = flat.permute(0, 2, 1, 3).reshape(batch, heads, queries * points, 1)
                gathered = level_value.gather(2, index.expand(-1, -1, -1, head_dim))
                gathered = gathered.view(batch, heads, queries, points, head_dim).permute(0, 2, 1, 3, 4)
                scale = corner_weight * inside * weights[:, :, :, level]  # (B, Q, heads, P)
                output = output + (gathered * scale[..., None]).sum(3)
    return output.reshape(batch, queries, heads * head_dim)


class _PeakMemory:
    """Peak memory above the current level, for the duration of a ``with`` block."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_now()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            # ru_maxrss is the lifetime peak (KiB on Linux): fresh subprocesses keep it meaningful
            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def _rss_now() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def attention_worker(implementation: str, queries: int, device_name: str, repeats: int, queue: mp.Queue) -> None:
    from focalnet_pl.layers import ms_deform_attn_sample

    device = torch.device(device_name)
    torch.manual_seed(0)
    batch, heads, head_dim, points = 1, 8, 32, 4
    shapes = torch.tensor(ATTENTION_LEVELS, dtype=torch.long, device=device)
    length = int((shapes[:, 0] * shapes[:, 1]).sum())
    value = torch.randn(batch, length, heads, head_dim, device=device, requires_grad=True)
    locations = torch.rand(batch, queries, heads, len(ATTENTION_LEVELS), points, 2, device=device, requires_grad=True)
    weights = torch.rand(batch, queries, heads, len(ATTENTION_LEVELS), points, device=device).softmax(-1)
    weights.requires_grad_(True)
    upstream = torch.randn(batch, queries, heads * head_dim, device=device)
    function = naive_ms_deform_attn if implementation == "naive" else ms_deform_attn_sample

    def step() -> None:
        out = function(value, shapes, locations, weights)
        (out * upstream).sum().backward()
        value.grad = locations.grad = weights.grad = None

    step()  # warm-up
    _sync(device)
    with _PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            step()
        _sync(device)
        elapsed = (time.perf_counter() - start) / repeats
        cpu = (time.process_time() - cpu_start) / repeats
    queue.put({"ms": elapsed * 1e3, "cpu_ms": cpu * 1e3, "peak_mb": memory.peak_mb})


def dino_worker(size: int, device_name: str, repeats: int, queue: mp.Queue) -> None:
    import yaml
    from detectron2.modeling import build_model
    from detectron2.structures import Boxes, Instances

    import focalnet_pl.d2  # noqa: F401
    import focalnet_pl.dino  # noqa: F401
    from focalnet_pl.d2 import build_detectron2_cfg

    device = torch.device(device_name)
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/dino_focalnet_t.yaml").read_text())
    detectron2 = config["model"]["init_args"]["detectron2"]
    detectron2["MODEL"]["DINO"]["NUM_CLASSES"] = 80
    detectron2["MODEL"]["DEVICE"] = device_name
    torch.manual_seed(0)
    model = build_model(build_detectron2_cfg(detectron2)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(10, 2, generator=generator) * size * 0.7
    boxes = torch.cat([corners, corners + 16 + torch.rand(10, 2, generator=generator) * size * 0.3], 1)
    instances = Instances((size, size))
    instances.gt_boxes = Boxes(boxes.clamp(max=size - 1))
    instances.gt_classes = torch.randint(0, 80, (10,), generator=generator)
    batch = [{"image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8).float(), "instances": instances,
              "height": size, "width": size}]

    def step() -> None:
        loss = sum(model(batch).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up (also allocates the optimizer state)
    _sync(device)
    with _PeakMemory(device) as memory:
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            step()
        _sync(device)
        elapsed = (time.perf_counter() - start) / repeats
        cpu = (time.process_time() - cpu_start) / repeats
    queue.put({"ms": elapsed * 1e3, "cpu_ms": cpu * 1e3, "peak_mb": memory.peak_mb,
               "params_m": sum(p.numel() for p in model.parameters()) / 1e6})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["attention", "dino"], default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 800])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    results: dict = {"device": args.device, "threads": torch.get_num_threads(), "torch": torch.__version__}
    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} repeats={args.repeats}")

    if args.only in (None, "attention"):
        print("\nMulti-scale deformable attention, forward + backward, batch 1, 8 heads x 32, 4 points,")
        print(f"levels {ATTENTION_LEVELS} (a 512 px image at strides 8-64)")
        print(f"{'case':<18}{'naive ms':>10}{'library ms':>12}{'speed-up':>10}{'naive cpu-ms':>14}{'library cpu-ms':>16}"
              f"{'cpu ratio':>11}{'naive MB':>10}{'library MB':>12}{'mem ratio':>11}")
        results["attention"] = {}
        for case, queries in ATTENTION_CASES.items():
            naive = run_isolated(attention_worker, "naive", queries, args.device, args.repeats)
            library = run_isolated(attention_worker, "library", queries, args.device, args.repeats)
            results["attention"][case] = {"naive": naive, "library": library}
            print(f"{case:<18}{naive['ms']:>10.1f}{library['ms']:>12.1f}{naive['ms'] / library['ms']:>9.2f}x"
                  f"{naive['cpu_ms']:>14.1f}{library['cpu_ms']:>16.1f}{naive['cpu_ms'] / library['cpu_ms']:>10.2f}x"
                  f"{naive['peak_mb']:>10.0f}{library['peak_mb']:>12.0f}"
                  f"{naive['peak_mb'] / max(library['peak_mb'], 1e-6):>10.2f}x")

    if args.only in (None, "dino"):
        print("\nDINO-FocalNet-T (4-scale, hidden 256, 6+6 layers, 900 queries, 100 dn), one training step,")
        print("batch 1, 10 gt boxes, AdamW")
        print(f"{'image':<10}{'step s':>10}{'cpu s':>10}{'peak MB':>10}{'time vs first':>15}{'mem vs first':>14}")
        results["dino"] = {}
        for size in args.sizes:
            results["dino"][size] = run_isolated(dino_worker, size, args.device, args.repeats)
        reference = results["dino"][args.sizes[0]]
        for size in args.sizes:
            entry = results["dino"][size]
            print(f"{size:>4} px   {entry['ms'] / 1e3:>10.2f}{entry['cpu_ms'] / 1e3:>10.2f}{entry['peak_mb']:>10.0f}"
                  f"{entry['ms'] / reference['ms']:>14.2f}x{entry['peak_mb'] / reference['peak_mb']:>13.2f}x")
        print(f"parameters: {reference['params_m']:.1f} M")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

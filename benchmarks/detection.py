"""GPU training speed of DINO and Mask2Former: fused vs pure-PyTorch deformable attention, GPU-busy time, memory.

    python benchmarks/detection.py --device cuda           # every figure below, in one run
    python benchmarks/detection.py --device cpu            # smoke run: the same code at tiny sizes
    TRITON_INTERPRET=1 FOCALNET_PL_MSDA=triton python benchmarks/detection.py --device cpu   # + fused paths
    python benchmarks/detection.py --device cuda --only attention dino

Sections (``--only`` picks some):

``attention``: multi-scale deformable attention sampling alone, forward + backward, batch 2, 8 heads x 32,
    4 points, at the level sizes of an 800x1333 image (4 levels at strides 8-64, 5 levels at 4-64), for
    the decoder's 900 + 200 queries and the encoder's one query per token; float32 and bfloat16; the
    pure-PyTorch path, the fused Triton kernel and, where it is installed, the Deformable DETR CUDA
    extension.
``dino``: DINO-FocalNet-T and -L, 4- and 5-scale (``configs/dino_focalnet_{t,l}.yaml`` with the scales
    overridden), one AdamW training step with bf16 autocast on a batch of 2 images (800x1333 and 800x1199,
    20 boxes each; the batch is copied from pinned host memory each step, as the loaders do), with the
    pure-PyTorch and the fused attention: images/s, the fraction of the step the GPU is busy (union of
    all kernel and copy intervals in a torch.profiler trace of a few steps, over the unprofiled step
    time), kernels per step, host syncs per step (CUDA sync-debug warnings) and peak memory.
``mask2former``: the same for Mask2Former-T and -L (ADE20K semantic configs, 512 and 640 px crops,
    batch 2, 10 masks per image), and its deformable pixel decoder alone (forward + backward).
``memory``: peak GPU memory of a DINO-FocalNet-H training step at 800x1333, batch 1, bf16, sharded with
    FSDP2 (``focalnet_pl.distributed.shard_units``, as ``configs/strategy/fsdp.yaml``) with activation
    checkpointing on one device, next to ``benchmarks/memory.py``'s estimate for one GPU.

Every model measurement runs in a fresh subprocess (clean memory counters, no state carried over). The
CPU smoke run uses tiny widths and 64-96 px images: its times say nothing about speed; it checks that
every code path of this script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _isolated import run_isolated  # noqa: E402

SECTIONS = ("attention", "dino", "mask2former", "memory")
IMAGE_SIZES = {"cuda": [(800, 1333), (800, 1199)], "cpu": [(64, 96), (64, 80)]}
# tiny widths for the CPU smoke run
SMOKE_FOCALNET = {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0}
SMOKE_DINO = {"HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2, "DIM_FEEDFORWARD": 64,
              "NUM_QUERIES": 30, "DN_NUMBER": 10, "NUM_SELECT": 20}
SMOKE_MASK2FORMER = {
    "SEM_SEG_HEAD": {"CONVS_DIM": 32, "MASK_DIM": 32, "TRANSFORMER_ENC_LAYERS": 1, "DEFORMABLE_NUM_HEADS": 4,
                     "DEFORMABLE_DIM_FEEDFORWARD": 64},
    "MASK_FORMER": {"HIDDEN_DIM": 32, "NHEADS": 4, "DIM_FEEDFORWARD": 64, "NUM_OBJECT_QUERIES": 8, "DEC_LAYERS": 3,
                    "TRAIN_NUM_POINTS": 256},
}
DINO_MODELS = {  # name -> (config, IN_FEATURES, NUM_FEATURE_LEVELS)
    "DINO-FocalNet-T 4-scale": ("dino_focalnet_t.yaml", ["res3", "res4", "res5"], 4),
    "DINO-FocalNet-T 5-scale": ("dino_focalnet_t.yaml", ["res2", "res3", "res4", "res5"], 5),
    "DINO-FocalNet-L 4-scale": ("dino_focalnet_l.yaml", ["res3", "res4", "res5"], 4),
    "DINO-FocalNet-L 5-scale": ("dino_focalnet_l.yaml", ["res2", "res3", "res4", "res5"], 5),
}
MASK2FORMER_MODELS = {  # name -> (config, crop size on GPU)
    "Mask2Former-FocalNet-T": ("mask2former_focalnet_t_ade20k_semantic.yaml", 512),
    "Mask2Former-FocalNet-L": ("mask2former_focalnet_l_ade20k_semantic.yaml", 640),
}


# ---- helpers -----------------------------------------------------------------------------------------------
def machine_description(device: torch.device) -> str:
    from focalnet_pl.cpu_fastpath import cpu_description

    parts = [f"torch {torch.__version__}"]
    with contextlib.suppress(ImportError):
        import triton

        parts.append(f"triton {triton.__version__}")
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        parts.append(f"GPU {properties.name} (sm_{properties.major}{properties.minor}, "
                     f"{properties.total_memory / 2**30:.0f} GiB)")
    parts.append(f"CPU {cpu_description()}, {torch.get_num_threads()} threads")
    return ", ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_busy_seconds(fn, device: torch.device, steps: int) -> tuple[float, float]:
    """(seconds per step during which the GPU runs kernels or copies, kernels per step) from a profiler trace:
    the union of all device activity intervals. (0, 0) on CPU."""
    if device.type != "cuda":
        return 0.0, 0.0
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
        for _ in range(steps):
            fn()
        synchronize(device)
    intervals = sorted((event.start_ns(), event.end_ns()) for event in trace.profiler.kineto_results.events()
                       if event.device_type() == DeviceType.CUDA)
    busy, current_start, current_end = 0, None, None
    for start, end in intervals:
        if current_end is None or start > current_end:
            if current_end is not None:
                busy += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        busy += current_end - current_start
    return busy / 1e9 / steps, len(intervals) / steps


def host_syncs(fn, device: torch.device) -> int:
    """Synchronising calls in one ``fn()``: CUDA sync-debug warnings on a GPU; on CPU the value reads that
    :class:`focalnet_pl.profiling.HostSyncAudit` finds in this package (an upper bound: on CPU it cannot
    tell the tensors that stay on the host, such as the loader's targets, from device tensors)."""
    if device.type == "cuda":
        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message).lower() for w in caught)
    from focalnet_pl.profiling import HostSyncAudit

    with HostSyncAudit() as audit:
        fn()
    return audit.in_package


class PeakMemory:
    """Peak memory (MiB) above the level at entry: CUDA allocator peak, or CPU peak resident set size."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _resident_mb()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


def _resident_mb() -> float:
    import resource

    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def model_spec(config: str, smoke: bool, overrides: dict) -> dict:
    """The ``detectron2`` dict of a shipped config with ``overrides`` (and the smoke run's tiny widths)."""
    spec = yaml.safe_load((REPO / "configs" / config).read_text())["model"]["init_args"]["detectron2"]
    model = spec["MODEL"]
    model["FOCALNET"]["WEIGHTS"] = ""
    model["WEIGHTS"] = ""
    for key, value in overrides.items():
        model.setdefault(key, {}).update(value)
    if smoke:
        model["FOCALNET"].update(SMOKE_FOCALNET)
        if "DINO" in model:
            model["DINO"].update(SMOKE_DINO)
        if "MASK_FORMER" in model:
            for key, value in SMOKE_MASK2FORMER.items():
                model[key].update(value)
    return spec


def build(spec: dict, device: torch.device) -> torch.nn.Module:
    from detectron2.modeling import build_model

    from focalnet_pl.d2 import build_detectron2_cfg

    spec["MODEL"]["DEVICE"] = device.type
    torch.manual_seed(0)
    return build_model(build_detectron2_cfg(spec)).to(device).train()


def host_batch(sizes: list[tuple[int, int]], kind: str, num_classes: int, objects: int,
               device: torch.device) -> list[dict]:
    """Synthetic loader output: uint8 images (pinned on CUDA, as the loaders pin them) with boxes or masks."""
    from detectron2.structures import Boxes, Instances

    generator = torch.Generator().manual_seed(0)
    batch = []
    for height, width in sizes:
        image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        instances = Instances((height, width))
        instances.gt_classes = torch.randint(0, num_classes, (objects,), generator=generator)
        corners = torch.rand(objects, 2, generator=generator) * torch.tensor([width, height]) * 0.7
        extent = 8 + torch.rand(objects, 2, generator=generator) * torch.tensor([width, height]) * 0.3
        boxes = torch.cat([corners, (corners + extent).minimum(torch.tensor([width - 1.0, height - 1.0]))], 1)
        if kind == "boxes":
            instances.gt_boxes = Boxes(boxes)
        else:  # one rectangle mask per object
            masks = torch.zeros(objects, height, width, dtype=torch.bool)
            for mask, (x0, y0, x1, y1) in zip(masks, boxes.long().tolist()):
                mask[y0:y1, x0:x1] = True
            instances.gt_masks = masks
        record = {"image": image.pin_memory() if device.type == "cuda" else image, "instances": instances,
                  "height": height, "width": width}
        batch.append(record)
    return batch


def training_step(model: torch.nn.Module, batch: list[dict], device: torch.device):
    """One bf16-autocast AdamW step, the batch copied to the device as the datamodules copy it."""
    from datamodules.coco import ListOfDictsDataModule

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    transfer = ListOfDictsDataModule(len(batch), 1, 0).transfer_batch_to_device

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            losses = model(transfer(batch, device, 0))
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(step, device: torch.device, steps: int, images: int) -> dict:
    """Warm-up, then images/s, GPU-busy fraction, kernels and host syncs per step, peak memory."""
    for _ in range(2):
        step()
    with PeakMemory(device) as memory:
        seconds = median_seconds(step, device, steps)
    busy, kernels = device_busy_seconds(step, device, min(steps, 3))
    return {"step_s": seconds, "images_per_s": images / seconds, "busy": busy / seconds, "kernels": kernels,
            "syncs": host_syncs(step, device), "peak_mb": memory.peak_mb}


def use_fused(fused: bool) -> str:
    """Install (or remove) the fused kernel for this process; returns the name of what samples."""
    from focalnet_pl.layers import get_fused_kernel, register_fused_kernel

    kernel = get_fused_kernel()
    if not fused:
        register_fused_kernel(None)
        return "pytorch"
    return kernel.name if kernel is not None else "none"


# ---- workers (each in a fresh process) -----------------------------------------------------------------
def dino_worker(name: str, fused: bool, device_name: str, steps: int, queue) -> None:
    device = torch.device(device_name)
    smoke = device.type == "cpu"
    config, in_features, levels = DINO_MODELS[name]
    spec = model_spec(config, smoke, {"FOCALNET": {"OUT_FEATURES": in_features},
                                      "DINO": {"IN_FEATURES": in_features, "NUM_FEATURE_LEVELS": levels,
                                               "NUM_CLASSES": 80}})
    kernel = use_fused(fused)
    model = build(spec, device)
    batch = host_batch(IMAGE_SIZES[device.type], "boxes", 80, 20, device)
    result = measure(training_step(model, batch, device), device, steps, len(batch))
    queue.put(dict(result, kernel=kernel, params_m=sum(p.numel() for p in model.parameters()) / 1e6))


def mask2former_worker(name: str, part: str, fused: bool, device_name: str, steps: int, queue) -> None:
    device = torch.device(device_name)
    smoke = device.type == "cpu"
    config, crop = MASK2FORMER_MODELS[name]
    spec = model_spec(config, smoke, {})
    kernel = use_fused(fused)
    model = build(spec, device)
    size = 64 if smoke else crop
    batch = host_batch([(size, size)] * 2, "masks", spec["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"], 10, device)
    if part == "model":
        result = measure(training_step(model, batch, device), device, steps, len(batch))
    else:  # the pixel decoder alone, forward + backward, on the backbone's features of the batch
        images = torch.stack([record["image"] for record in batch]).to(device).float()
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
            features = model.backbone(model.normalize(images))
        features = {key: value.detach().requires_grad_() for key, value in features.items()}
        decoder = model.pixel_decoder

        def step() -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                mask_features, maps = decoder(features)
            (mask_features.float().mean() + sum(m.float().mean() for m in maps)).backward()

        result = measure(step, device, steps, len(batch))
    queue.put(dict(result, kernel=kernel))


def attention_worker(levels: list[tuple[int, int]], queries: int | None, dtype_name: str, implementation: str,
                     device_name: str, repeats: int, queue) -> None:
    from focalnet_pl.layers import get_fused_kernel, ms_deform_attn_sample, spatial_shapes_tensor
    from focalnet_pl.layers.ms_deform_attn import _compiled_extension_kernel

    device = torch.device(device_name)
    dtype = getattr(torch, dtype_name)
    shapes = spatial_shapes_tensor(levels, device)
    tokens = sum(h * w for h, w in levels)
    queries = queries or tokens
    generator = torch.Generator(device=device).manual_seed(0)
    batch, heads, head_dim, points = 2, 8, 32, 4
    # as under bf16 autocast in the models: the value projection's output in bf16, locations and weights float32
    value = torch.randn(batch, tokens, heads, head_dim, device=device, generator=generator, dtype=dtype)
    locations = torch.rand(batch, queries, heads, len(levels), points, 2, device=device, generator=generator)
    weights = torch.rand(batch, queries, heads, len(levels), points, device=device, generator=generator).softmax(-1)
    inputs = [t.requires_grad_() for t in (value, locations, weights)]
    upstream = torch.randn(batch, queries, heads * head_dim, device=device, generator=generator, dtype=dtype)
    kernels = {"triton": get_fused_kernel(), "cuda-ext": _compiled_extension_kernel()}
    if implementation == "pytorch":
        def sample():
            return ms_deform_attn_sample(inputs[0], shapes, inputs[1], inputs[2], use_fused=False)
    else:
        kernel = kernels[implementation]
        if kernel is None or not kernel.accepts(value) or (implementation == "triton" and kernel.name != "triton"):
            queue.put(None)
            return
        starts = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])

        def sample():
            return kernel.fn(inputs[0], shapes, starts, inputs[1], inputs[2])

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            output = sample()
        (output * upstream).sum().backward()
        for tensor in inputs:
            tensor.grad = None

    step()
    step()
    with PeakMemory(device) as memory:
        seconds = median_seconds(step, device, repeats)
    queue.put({"ms": seconds * 1e3, "peak_mb": memory.peak_mb})


def memory_worker(device_name: str, queue) -> None:
    """DINO-FocalNet-H, FSDP2 + activation checkpointing on one device, one bf16 training step: peak memory."""
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    from focalnet_pl.distributed import ShardingPolicy, shard_units
    from focalnet_pl.tasks.detection import FSDP_BLOCK_TYPES

    device = torch.device(device_name)
    smoke = device.type == "cpu"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        spec = model_spec("dino_focalnet_h.yaml", smoke, {"DINO": {"NUM_CLASSES": 80}})
        holder = nn.Module()  # as in Lightning, the model is the one child of the sharded module
        holder.model = build(spec, device)
        names = {t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}" for t in FSDP_BLOCK_TYPES}
        units = [m for m in holder.modules() if f"{type(m).__module__}.{type(m).__qualname__}" in names]
        policy = ShardingPolicy(activation_checkpointing=True, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        shard_units(holder, units, policy, init_device_mesh(device.type, (1,)))
        model = holder.model
        size = (800, 1333) if not smoke else (64, 96)
        batch = host_batch([size], "boxes", 80, 20, device)
        step = training_step(model, batch, device)
        with PeakMemory(device) as memory:
            step()
            step()
        queue.put({"peak_gb": memory.peak_mb / 1024, "units": len(units),
                   "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "size": size})
    finally:
        dist.destroy_process_group()


# ---- sections ------------------------------------------------------------------------------------------
def attention_section(device: torch.device, repeats: int) -> dict:
    smoke = device.type == "cpu"
    height, width = (64, 96) if smoke else (800, 1333)
    strides = {"4-scale": (8, 16, 32, 64), "5-scale": (4, 8, 16, 32, 64)}
    print("\n## Deformable attention alone, forward + backward, batch 2, 8 heads x 32, 4 points "
          f"({height}x{width} image; ms, median of {repeats})\n")
    print("| levels | queries | dtype | pure PyTorch | fused (Triton) | speed-up | CUDA extension | "
          "fused vs extension | memory pure / fused MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = {}
    for scales, level_strides in strides.items():
        levels = [(-(-height // s), -(-width // s)) for s in level_strides]
        decoder_queries = 50 if smoke else 1100
        for case, queries in ((f"decoder {decoder_queries}", decoder_queries), ("encoder (all tokens)", None)):
            for dtype in ("float32", "bfloat16"):
                row = {impl: run_isolated(attention_worker, levels, queries, dtype, impl, device.type, repeats)
                       for impl in ("pytorch", "triton", "cuda-ext")}
                results[f"{scales}/{case}/{dtype}"] = row
                pure, fused, ext = row["pytorch"], row["triton"], row["cuda-ext"]
                print(f"| {scales} | {case} | {dtype} | {pure['ms']:.2f} | {_ms(fused)} | {_ratio(pure, fused, 'ms')} "
                      f"| {_ms(ext)} | {_ratio(ext, fused, 'ms')} | {pure['peak_mb']:.0f} / {_mb(fused)} |")
    return results


def _ms(entry: dict | None) -> str:
    return f"{entry['ms']:.2f}" if entry else "n/a"


def _mb(entry: dict | None) -> str:
    return f"{entry['peak_mb']:.0f}" if entry else "n/a"


def _ratio(reference: dict | None, candidate: dict | None, key: str) -> str:
    return f"{reference[key] / candidate[key]:.2f}x" if reference and candidate else "n/a"


def model_table(title: str, rows: dict[str, dict[str, dict]]) -> None:
    print(f"\n## {title}\n")
    print("| model | attention | images/s | step ms | fused speed-up | GPU busy | kernels/step | host syncs/step "
          "| peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, pair in rows.items():
        for label, entry in pair.items():
            speedup = _ratio(pair["pure PyTorch"], entry, "step_s") if label != "pure PyTorch" else ""
            busy = f"{100 * entry['busy']:.0f}%" if entry["busy"] else "n/a (CPU)"
            kernels = f"{entry['kernels']:.0f}" if entry["kernels"] else "n/a"
            peak = f"{entry['peak_mb']:.0f}" if entry["kernels"] else "n/a"
            print(f"| {name} | {label} ({entry['kernel']}) | {entry['images_per_s']:.2f} | {entry['step_s'] * 1e3:.0f} "
                  f"| {speedup} | {busy} | {kernels} | {entry['syncs']} | {peak} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps per model (default 10 GPU, 2 CPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    smoke = device.type == "cpu"
    steps = args.steps or (2 if smoke else 10)
    print(machine_description(device))
    if smoke:
        print("CPU smoke run: tiny widths and images; the figures only show that every path runs.")
    results: dict = {"machine": machine_description(device)}
    fused_label = "fused (Triton)"

    if "attention" in args.only:
        results["attention"] = attention_section(device, steps)
    if "dino" in args.only:
        rows = {name: {implementation: run_isolated(dino_worker, name, fused, device.type, steps)
                       for implementation, fused in (("pure PyTorch", False), (fused_label, True))}
                for name in DINO_MODELS}
        sizes = " + ".join(f"{h}x{w}" for h, w in IMAGE_SIZES[device.type])
        model_table(f"DINO training step, bf16 autocast, batch 2 ({sizes}), 20 boxes per image, AdamW", rows)
        results["dino"] = rows
    if "mask2former" in args.only:
        rows = {name: {implementation: run_isolated(mask2former_worker, name, "model", fused, device.type, steps)
                       for implementation, fused in (("pure PyTorch", False), (fused_label, True))}
                for name in MASK2FORMER_MODELS}
        model_table("Mask2Former training step (ADE20K semantic), bf16 autocast, batch 2, 10 masks per image", rows)
        decoder = {f"{name} pixel decoder": {
            implementation: run_isolated(mask2former_worker, name, "pixel_decoder", fused, device.type, steps)
            for implementation, fused in (("pure PyTorch", False), (fused_label, True))} for name in MASK2FORMER_MODELS}
        model_table("Mask2Former pixel decoder alone, forward + backward, bf16 autocast, batch 2", decoder)
        results["mask2former"] = {**rows, **decoder}
    if "memory" in args.only:
        import memory as estimate

        measured = run_isolated(memory_worker, device.type)
        config = REPO / "configs" / "dino_focalnet_h.yaml"
        stats = estimate.model_stats(*estimate.build_meta_model(config), ["FocalNetBlock", "DeformableEncoderLayer", "DecoderLayer"])
        estimated = estimate.fsdp_total_gb(config, stats, gpus=1, image_size=(800, 1333), checkpointing=True)
        print("\n## DINO-FocalNet-H, FSDP2 + activation checkpointing on one device, batch 1, bf16\n")
        print(f"measured peak ({measured['size'][0]}x{measured['size'][1]}, {measured['params_m']:.1f}M parameters, "
              f"{measured['units']} units): {measured['peak_gb']:.2f} GB; benchmarks/memory.py estimate for the full "
              f"model at 800x1333 on 1 GPU: {estimated:.2f} GB"
              + (" (smoke run: the measured model is the tiny one)" if smoke else ""))
        results["memory"] = {"measured": measured, "estimate_gb": estimated}
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

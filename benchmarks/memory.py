"""Memory per GPU of DINO-FocalNet-H training under DDP vs FSDP2 (``configs/strategy/fsdp.yaml``).

    python benchmarks/memory.py                       # DINO-FocalNet-H, 8/16/64 GPUs, 800x1333 batch 1
    python benchmarks/memory.py --gpus 8 32 --budget-gb 40 --image-size 800 1333

What is computed from the real model (built from ``configs/dino_focalnet_h.yaml`` on the meta device:
exact parameter counts, no weights allocated):

* model states per GPU. DDP: fp32 weights + fp32 gradients (in the all-reduce buckets,
  ``gradient_as_bucket_view``) + AdamW ``exp_avg``/``exp_avg_sq`` = 16 bytes per parameter on every GPU.
  FSDP2: the same 16 bytes per parameter divided by the GPU count, plus what is gathered at a time:
  the root unit (stem, heads, embeddings: everything outside the FSDP units, kept gathered through
  forward and backward) and two units (the one computing and the prefetched one) in bf16, each with its
  bf16 gradient in backward.
* backbone activations: a forward of the FocalNet-H backbone on the meta device at the given image
  size, batch 1, in bf16, counting every tensor autograd saves for backward (saved-tensor hooks;
  weights excluded). With per-block activation checkpointing only each block's input is kept, plus one
  block's activations while it is recomputed in backward.

The DINO encoder/decoder activations are an ESTIMATE (labelled so in the table): their forward has
data-dependent steps (query selection, matching) that cannot run on the meta device. The estimate
counts, per deformable encoder layer, the saved tensors of the 256-d token stream (norms, value and
offset/attention projections, 2048-d FFN) over every multi-scale token, and the decoder's 900 + 200
denoising queries; with activation checkpointing one layer's worth is alive at a time.

Framework overheads (CUDA context ~0.5 GB, allocator fragmentation, NCCL buffers, data) are not included;
the budget check keeps 15% headroom for them.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

REPO = Path(__file__).resolve().parents[1]
GB = 1024**3


@dataclass
class ModelStats:
    """Parameter counts of the model and of its FSDP units."""

    name: str
    total: int
    backbone: int
    units: int
    largest_unit: int
    root: int


def build_meta_model(config: Path) -> tuple[nn.Module, str]:
    """The detectron2 model of a DetectionTask config, on the meta device (shapes only)."""
    from detectron2.modeling import build_model

    from focalnet_pl.d2.config import NUM_CLASSES_KEYS, build_detectron2_cfg, get_dotted

    spec = yaml.safe_load(config.read_text())["model"]["init_args"]["detectron2"]
    cfg = build_detectron2_cfg(spec)
    cfg.defrost()
    key = NUM_CLASSES_KEYS[cfg.MODEL.META_ARCHITECTURE]
    node = get_dotted(cfg, key.rsplit(".", 1)[0])
    if not node[key.rsplit(".", 1)[1]] or node[key.rsplit(".", 1)[1]] < 2:
        node[key.rsplit(".", 1)[1]] = 80
    cfg.MODEL.DEVICE = "meta"
    cfg.freeze()
    with torch.device("meta"):
        model = build_model(cfg)
    return model, f"{cfg.MODEL.META_ARCHITECTURE} + {cfg.MODEL.FOCALNET.VARIANT} ({config.name})"


def model_stats(model: nn.Module, name: str, unit_types: Iterable[str]) -> ModelStats:
    unit_types = set(unit_types)
    units = [m for m in model.modules() if type(m).__name__ in unit_types]
    in_units = {id(p) for u in units for p in u.parameters()}
    total = sum(p.numel() for p in model.parameters())
    backbone = sum(p.numel() for p in model.backbone.parameters()) if hasattr(model, "backbone") else total
    unit_sizes = [sum(p.numel() for p in u.parameters()) for u in units]
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_units)
    return ModelStats(name, total, backbone, len(units), max(unit_sizes), root)


def ddp_states_gb(stats: ModelStats) -> dict[str, float]:
    p = stats.total
    return {"params": 4 * p / GB, "grads": 4 * p / GB, "adamw": 8 * p / GB}


def fsdp_states_gb(stats: ModelStats, gpus: int) -> dict[str, float]:
    p = stats.total
    gathered = 2 * stats.root + 2 * 2 * stats.largest_unit  # bf16 root + (current + prefetched) unit
    gathered_grads = 2 * stats.root + 2 * stats.largest_unit  # bf16 gradients before the reduce-scatter
    return {"params": 4 * p / gpus / GB, "grads": 4 * p / gpus / GB, "adamw": 8 * p / gpus / GB,
            "gathered": (gathered + gathered_grads) / GB}


def backbone_activations_gb(variant: str, image_size: tuple[int, int]) -> tuple[float, float]:
    """(without, with per-block checkpointing) GB saved for backward by the backbone, bf16, batch 1."""
    from focalnet_pl import create_focalnet
    from focalnet_pl.focalnet import FocalNetBlock

    with torch.device("meta"):
        backbone = create_focalnet(variant, features_only=True).to(torch.bfloat16)
    params = {id(p) for p in backbone.parameters()}
    saved: list[int] = [0]
    per_block: dict[int, int] = {}
    block_inputs: list[int] = []
    current: list[int | None] = [None]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(tensor) not in params and id(base) not in params:
            nbytes = tensor.numel() * tensor.element_size()
            saved[0] += nbytes
            if current[0] is not None:
                per_block[current[0]] = per_block.get(current[0], 0) + nbytes
        return tensor

    def enter(module: nn.Module, args: tuple) -> None:
        current[0] = id(module)
        block_inputs.append(args[0].numel() * args[0].element_size())

    def leave(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        current[0] = None

    for block in (m for m in backbone.modules() if isinstance(m, FocalNetBlock)):
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave)
    images = torch.empty(1, 3, *image_size, device="meta", dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        backbone(images)
    without = saved[0]
    with_checkpointing = without - sum(per_block.values()) + sum(block_inputs) + max(per_block.values())
    return without / GB, with_checkpointing / GB


def dino_head_activations_gb(image_size: tuple[int, int], strides: Iterable[int], hidden: int = 256,
                             ffn: int = 2048, enc_layers: int = 6, dec_layers: int = 6, queries: int = 1100,
                             heads: int = 8, levels: int = 5, points: int = 4) -> tuple[float, float]:
    """ESTIMATE (not measured) of the DINO transformer's saved activations in bf16: (without, with) checkpointing."""
    tokens = sum(math.ceil(image_size[0] / s) * math.ceil(image_size[1] / s) for s in strides)
    samples = heads * levels * points
    # per token and encoder layer: input + query(+pos), value proj, offsets (2x) and weights (+softmax),
    # sampled values, output proj, residual + norm, FFN in (hidden->ffn), GELU/ReLU, FFN out, norm
    enc_per_token = 6 * hidden + 4 * samples + 2 * samples * (hidden // heads) // 4 + 2 * ffn + 2 * hidden
    enc_layer = tokens * enc_per_token * 2
    dec_layer = queries * (12 * hidden + 2 * ffn + 4 * samples) * 2 + queries * queries * heads * 2 * 2
    without = enc_layers * enc_layer + dec_layers * dec_layer
    with_checkpointing = (enc_layers * tokens + dec_layers * queries) * hidden * 2 + max(enc_layer, dec_layer)
    return without / GB, with_checkpointing / GB


def activations_gb(config: Path, image_size: tuple[int, int]) -> tuple[tuple[float, float], tuple[float, float]]:
    """((backbone, DINO transformer) without, (backbone, transformer) with activation checkpointing), GB,
    for the model of ``config`` at ``image_size``, batch 1, bf16."""
    spec = yaml.safe_load(config.read_text())["model"]["init_args"]["detectron2"]["MODEL"]
    dino = spec.get("DINO", {})
    bb_none, bb_ckpt = backbone_activations_gb(spec["FOCALNET"]["VARIANT"], image_size)
    levels = dino.get("NUM_FEATURE_LEVELS", 5)
    strides = [2 ** int(name[-1]) for name in dino.get("IN_FEATURES", ["res3", "res4", "res5"])]
    while len(strides) < levels:  # extra levels: stride-2 convolutions on the last map
        strides.append(strides[-1] * 2)
    head_none, head_ckpt = dino_head_activations_gb(
        image_size, strides=strides,
        hidden=dino.get("HIDDEN_DIM", 256), ffn=dino.get("DIM_FEEDFORWARD", 2048),
        enc_layers=dino.get("ENC_LAYERS", 6), dec_layers=dino.get("DEC_LAYERS", 6),
        queries=dino.get("NUM_QUERIES", 900) + 2 * dino.get("DN_NUMBER", 100), heads=dino.get("NHEADS", 8),
        levels=levels, points=dino.get("ENC_N_POINTS", 4))
    return (bb_none, head_none), (bb_ckpt, head_ckpt)


def fsdp_total_gb(config: Path, stats: ModelStats, gpus: int, image_size: tuple[int, int], checkpointing: bool) -> float:
    """Estimated GB per GPU of FSDP2 training: model states plus activations."""
    activations = activations_gb(config, image_size)[1 if checkpointing else 0]
    return sum(fsdp_states_gb(stats, gpus).values()) + sum(activations)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=REPO / "configs/dino_focalnet_h.yaml")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--image-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--budget-gb", type=float, default=40.0)
    parser.add_argument("--unit-types", nargs="+", default=["FocalNetBlock", "DeformableEncoderLayer", "DecoderLayer"])
    args = parser.parse_args(argv)

    model, name = build_meta_model(args.config)
    stats = model_stats(model, name, args.unit_types)
    size = tuple(args.image_size)
    (bb_none, head_none), (bb_ckpt, head_ckpt) = activations_gb(args.config, size)

    print(f"# {stats.name}")
    print(f"parameters: {stats.total / 1e6:.1f}M (backbone {stats.backbone / 1e6:.1f}M); "
          f"{stats.units} FSDP units ({', '.join(args.unit_types)}), largest {stats.largest_unit / 1e6:.1f}M, "
          f"root unit {stats.root / 1e6:.1f}M")
    print(f"activations at {size[0]}x{size[1]}, batch 1, bf16: backbone (measured on meta) {bb_none:.2f} GB, "
          f"{bb_ckpt:.2f} GB with block checkpointing; DINO transformer (ESTIMATE) {head_none:.2f} GB, "
          f"{head_ckpt:.2f} GB with layer checkpointing")
    act_none, act_ckpt = bb_none + head_none, bb_ckpt + head_ckpt
    header = ("| strategy | GPUs | params | grads | AdamW | gathered | states | + activations (no AC) "
              "| + activations (AC) | fits |")
    print()
    print(header)
    print("|" + "---|" * 10)
    usable = args.budget_gb * 0.85
    for gpus in args.gpus:
        for strategy, states in (("DDP", ddp_states_gb(stats)), ("FSDP2", fsdp_states_gb(stats, gpus))):
            total_states = sum(states.values())
            with_ac, without_ac = total_states + act_ckpt, total_states + act_none
            fits = "yes" if with_ac <= usable else "no"
            print(f"| {strategy} | {gpus} | {states['params']:.2f} | {states['grads']:.2f} | {states['adamw']:.2f} "
                  f"| {states.get('gathered', 0.0):.2f} | {total_states:.2f} | {without_ac:.2f} | {with_ac:.2f} "
                  f"| {fits} (AC, {args.budget_gb:.0f} GB) |")
    print()
    print(f"GB per GPU. 'fits': total with activation checkpointing <= 85% of {args.budget_gb:.0f} GB. "
          "DINO transformer activations are an estimate (see the module docstring); backbone figures are measured.")


if __name__ == "__main__":
    main()

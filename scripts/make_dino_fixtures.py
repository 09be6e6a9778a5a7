"""Golden DINO outputs from the official FocalNet-DINO code, for tests/test_dino_official.py.

Usage (the official code is read from a checkout given on the command line, never copied here)::

    git --git-dir=/path/to/FocalNet-DINO.git archive HEAD | tar -x -C /tmp/FocalNet-DINO
    python scripts/make_dino_fixtures.py /tmp/FocalNet-DINO [--output tests/fixtures/dino_official.pt]

For the 4-scale FocalNet-L fl3 config (``DINO_4scale_focalnet_large_fl3.py``) and the 5-scale fl4
config (``DINO_5scale_focalnet_large_fl4.py``) this builds the official model with the config's
values except for sizes (a tiny FocalNet of the same kind: conv embedding, post-LN, layer scale;
1 encoder / 2 decoder layers, 30 queries, a small FFN; the hidden size stays 256, which the
official query-position embedding assumes), from a fixed seed. Every weight is then perturbed to be
trained-like (no zero heads or offsets, norms away from 1; the 11 class rows of ids that are no COCO
category low, as training leaves them) and rounded to 8-bit floats, so that the checkpoint stays
small while the float64 model computes with exactly the stored values.

The official CUDA deformable-attention op is not compiled: the official pure-PyTorch
``ms_deform_attn_core_pytorch`` is substituted for it at run time.

The fixture holds, per model: ``checkpoint`` (``{"model": state dict in the official layout,
"args": argparse.Namespace, "epoch": 11}``, as the official ``main.py`` saves it), ``architecture``
(the tiny sizes), ``init`` (how the official code initialises each tensor) and ``cases`` (single images of odd sizes and a padded batch of 2, uint8 pixels,
the original sizes asked of the post-processing, and the float64 outputs: class logits and boxes of
every decoder layer, the selected encoder proposals, and the post-processed top-k). Tensors of equal
name and shape are shared between the two models so that the file stays small.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import types
from pathlib import Path

import torch

CONFIGS = {
    "fl3": "config/DINO/DINO_4scale_focalnet_large_fl3.py",
    "fl4": "config/DINO/DINO_5scale_focalnet_large_fl4.py",
}
#: the tiny sizes put in place of the config's (everything else is the config's value)
TINY = {
    "enc_layers": 1,
    "dec_layers": 2,
    "dim_feedforward": 32,
    "num_queries": 30,
    "enc_n_points": 2,
    "dec_n_points": 2,
    "use_checkpoint": False,
    "device": "cpu",
}
BACKBONE = {"embed_dim": 8, "depths": [1, 1, 1, 1]}
#: (height, width) of the images of each case: single images of odd sizes and padded batches of 2; in the
#: last one the small image has fewer valid encoder positions than queries, so that padded positions
#: (zero memory, infinite boxes) are selected as queries
CASES = [[(97, 123)], [(75, 61)], [(83, 110), (101, 71)], [(90, 77), (19, 23)]]
SEED = 20240612
#: the checkpoint's dtype: weights are rounded to its values (8-bit floats keep the file small; the
#: float64 models compute with exactly these values)
STORAGE_DTYPE = torch.float8_e4m3fn


def read_config(checkout: Path, relative: str) -> dict:
    """The official config file's values (its ``_base_`` files first), as the official ``SLConfig`` reads them."""
    path = checkout / relative
    values = runpy.run_path(str(path))
    merged: dict = {}
    for base in values.get("_base_", []):
        merged.update(read_config(checkout, str(Path(relative).parent / base)))
    merged.update({k: v for k, v in values.items() if not k.startswith("_")})
    return merged


def import_official(checkout: Path) -> types.SimpleNamespace:
    """Import the official modules, with ``ms_deform_attn_core_pytorch`` in place of the CUDA op."""
    extension = types.ModuleType("MultiScaleDeformableAttention")

    def not_compiled(*args, **kwargs):
        raise RuntimeError("the official CUDA op is not compiled; the PyTorch core should have been used")

    extension.ms_deform_attn_forward = extension.ms_deform_attn_backward = not_compiled
    sys.modules.setdefault("MultiScaleDeformableAttention", extension)
    sys.path.insert(0, str(checkout))
    from models.dino import backbone, deformable_transformer, dino, focal, position_encoding
    from models.dino.ops.functions.ms_deform_attn_func import ms_deform_attn_core_pytorch
    from models.dino.ops.modules import ms_deform_attn

    class PyTorchCore:
        @staticmethod
        def apply(value, shapes, level_start_index, locations, weights, im2col_step):
            return ms_deform_attn_core_pytorch(value, shapes, locations, weights)

    ms_deform_attn.MSDeformAttnFunction = PyTorchCore
    return types.SimpleNamespace(backbone=backbone, transformer=deformable_transformer, dino=dino, focal=focal,
                                 position_encoding=position_encoding)


def official_args(checkout: Path, name: str) -> argparse.Namespace:
    values = read_config(checkout, CONFIGS[name])
    values.update(TINY)
    # command-line defaults of the official main.py that the model builders read
    values.update({"dataset_file": "coco", "seed": 42, "config_file": CONFIGS[name]})
    return argparse.Namespace(**values)


def build_official(official: types.SimpleNamespace, args: argparse.Namespace) -> torch.nn.Module:
    """``build_dino(args)`` with a tiny FocalNet of the config's kind in place of the pretrained FocalNet-L."""
    fl4 = args.focal_levels == 4

    def tiny_backbone(args: argparse.Namespace) -> torch.nn.Module:
        body = official.focal.FocalNet(
            embed_dim=BACKBONE["embed_dim"], depths=BACKBONE["depths"], focal_levels=[args.focal_levels] * 4,
            focal_windows=[args.focal_windows] * 4, use_conv_embed=True, use_postln=True,
            use_postln_in_modulation=False, use_layerscale=True, normalize_modulator=fl4,
            out_indices=tuple(args.return_interm_indices), drop_path_rate=0.0,
        )
        joiner = official.backbone.Joiner(body, official.position_encoding.build_position_encoding(args))
        joiner.num_channels = [body.num_features[i] for i in args.return_interm_indices]
        return joiner

    official.dino.build_backbone = tiny_backbone
    model, _, postprocessors = official.dino.build_dino(args)
    model.postprocess = postprocessors["bbox"]
    return model


def init_statistics(official: types.SimpleNamespace, args: argparse.Namespace) -> dict[str, dict]:
    """How the official model initialises each tensor (the backbone aside: it comes from a pretrained
    checkpoint): ``{"constant": c}`` or ``{"value": tensor}`` where the init does not depend on the seed
    (the same for two seeds), else the ``mean``, ``std`` and ``absmax`` of the seed-0 draw."""
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(build_official(official, args).state_dict())
    stats = {}
    for key, value in states[0].items():
        if key.startswith("backbone."):
            continue
        value = value.double()
        if torch.equal(value, states[1][key].double()):
            constant = value.flatten()[0]
            stats[key] = {"constant": float(constant)} if bool((value == constant).all()) else {"value": value.float()}
        else:
            stats[key] = {"mean": float(value.mean()), "std": float(value.std()), "absmax": float(value.abs().max())}
    return stats


@torch.no_grad()
def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Trained-like weights: every parameter moved away from its init, then rounded to ``STORAGE_DTYPE`` values."""
    for _, parameter in model.named_parameters():  # shared heads appear once
        if parameter.dim() <= 1:
            noise = 0.1 * torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
        else:
            scale = max(float(parameter.std()), 0.02)
            noise = 0.5 * scale * torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
        parameter.add_(noise.to(parameter.dtype))
        parameter.copy_(parameter.to(STORAGE_DTYPE).to(parameter.dtype))


def shared_candidates(key: str) -> list[str]:
    """Names under which the other model may hold the same tensor: its own, and for the input projections
    the one of the same backbone stage (the 5-scale model has one more projection in front)."""
    parts = key.split(".")
    if parts[0] == "input_proj":
        return [".".join(["input_proj", str(int(parts[1]) + shift)] + parts[2:]) for shift in (0, -1, 1)]
    return [key]


@torch.no_grad()
def lower_unused_classes(model: torch.nn.Module, checkout: Path) -> None:
    """The class rows of the 11 ids that are no COCO category get the low bias training gives them
    (they are never a positive), so that, as with a released checkpoint, they do not win the encoder's
    query selection: a model with COCO's 80 classes then selects the same queries."""
    coco_ids = {int(i) for i in json.loads((checkout / "util/coco_id2name.json").read_text())}
    unused = [i for i in range(model.num_classes) if i not in coco_ids]
    for head in (model.class_embed[0], model.transformer.enc_out_class_embed):
        head.bias[unused] = -10.0


def storage_state_dict(model: torch.nn.Module, shared_with: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official state dict in ``STORAGE_DTYPE``; tied parameters stay one tensor, and tensors of ``shared_with``
    of the same role and shape are reused (one copy in the file; the backbones stay apart)."""
    by_storage: dict[tuple, torch.Tensor] = {}
    state = {}
    for key, value in model.state_dict().items():
        tie = (value.data_ptr(), tuple(value.shape), value.stride())
        if tie not in by_storage:
            by_storage[tie] = value.to(STORAGE_DTYPE)
        state[key] = by_storage[tie]
        if key.startswith("backbone."):
            continue
        for candidate in shared_candidates(key):
            other = shared_with.get(candidate)
            if other is not None and other.shape == value.shape:
                state[key] = other
                break
    return state


def images_for(sizes: list[tuple[int, int]], generator: torch.Generator) -> list[torch.Tensor]:
    """Smooth random uint8 images (low-resolution noise upsampled) of the given sizes."""
    images = []
    for height, width in sizes:
        coarse = torch.rand(1, 3, height // 8 + 2, width // 8 + 2, generator=generator, dtype=torch.float64)
        fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        noise = 0.1 * torch.rand(1, 3, height, width, generator=generator, dtype=torch.float64)
        images.append(((fine + noise).clamp(0, 1) * 255).round().to(torch.uint8)[0])
    return images


@torch.no_grad()
def run_case(model: torch.nn.Module, images: list[torch.Tensor]) -> dict:
    """Official forward (``nested_tensor_from_tensor_list`` pads to the largest image) and ``PostProcess``."""
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(3, 1, 1)
    normalised = [(image.to(torch.float64) / 255 - mean) / std for image in images]  # ToTensor + Normalize
    output = model(normalised)
    layers = output["aux_outputs"] + [{"pred_logits": output["pred_logits"], "pred_boxes": output["pred_boxes"]}]
    # the sizes the post-processing scales to ("orig_size"): as if the images had been resized by 2/3
    output_sizes = torch.tensor([[round(h * 1.5), round(w * 1.5)] for h, w in (i.shape[-2:] for i in images)])
    results = model.postprocess(output, output_sizes)
    return {
        "images": images,
        "output_sizes": output_sizes,
        "pred_logits": torch.stack([layer["pred_logits"] for layer in layers]),
        "pred_boxes": torch.stack([layer["pred_boxes"] for layer in layers]),
        "interm_logits": output["interm_outputs"]["pred_logits"],
        "interm_boxes": output["interm_outputs"]["pred_boxes"],
        "scores": torch.stack([r["scores"] for r in results]),
        "labels": torch.stack([r["labels"] for r in results]),
        "boxes": torch.stack([r["boxes"] for r in results]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of the official FocalNet-DINO repository")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "tests/fixtures/dino_official.pt")
    cli = parser.parse_args()
    official = import_official(cli.checkout.resolve())
    fixture: dict = {}
    shared: dict[str, torch.Tensor] = {}
    image_generator = torch.Generator().manual_seed(SEED)
    images = [images_for(sizes, image_generator) for sizes in CASES]  # the same images for both models
    for index, name in enumerate(CONFIGS):
        args = official_args(cli.checkout, name)
        init = init_statistics(official, args)
        torch.manual_seed(SEED + index)
        generator = torch.Generator().manual_seed(SEED + index)
        model = build_official(official, args)
        perturb(model, generator)
        lower_unused_classes(model, cli.checkout)
        state = storage_state_dict(model, shared)
        shared.update(state)
        model.double().eval()
        model.load_state_dict({k: v.double() for k, v in state.items()})
        cases = [run_case(model, case_images) for case_images in images]
        fixture[name] = {
            "checkpoint": {"model": state, "args": args, "epoch": args.epochs - 1},
            "architecture": dict(BACKBONE, focal_levels=args.focal_levels, focal_windows=args.focal_windows,
                                 normalize_modulator=args.focal_levels == 4),
            "cases": cases,
            "init": init,
        }
        worst = max(float(c["pred_logits"][1:].sub(c["pred_logits"][:1]).abs().max()) for c in cases)
        print(f"{name}: {len(state)} tensors, {args.num_feature_levels} levels, {len(cases)} cases; "
              f"decoder layers differ by up to {worst:.3f} in logits")
    cli.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, cli.output)
    print(f"wrote {cli.output} ({cli.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

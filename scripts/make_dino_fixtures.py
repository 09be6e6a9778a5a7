"""Golden DINO outputs from the official FocalNet-DINO code, for tests/test_dino_official.py.

Usage (the official code is read from checkouts given on the command line, never copied here)::

    git --git-dir=/path/to/FocalNet-DINO.git archive HEAD | tar -x -C /tmp/FocalNet-DINO
    git --git-dir=/path/to/detrex.git archive HEAD | tar -x -C /tmp/detrex
    python scripts/make_dino_fixtures.py /tmp/FocalNet-DINO --detrex /tmp/detrex [--output tests/fixtures/dino_official.pt]

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

With ``--detrex``, a ``detrex`` entry holds the same for detrex's DINO (``projects/dino``, the
FocalNet-L fl3 config: per-layer heads, position embedding offset -0.5 and temperature 10000, 80
contiguous COCO classes, 4 sampling points) built with the 4-scale model's weights (most tensors are
the same ones), per-layer heads made to differ, its own deformable-attention offsets; on single
images only (detrex evaluates padded batches without a padding mask) and without the post-processing
(detrex clips boxes to the image). detrex's compiled op is not needed: on CPU it runs its own
PyTorch implementation.
"""

from __future__ import annotations

import argparse
import json
import re
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
PROJECT = Path(__file__).resolve().parents[1]
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


def import_detrex(checkout: Path) -> types.SimpleNamespace:
    """detrex's DINO modules. Its compiled ops and the packages only other parts of detrex use (wandb,
    einops for EVA backbones, fairscale's checkpoint wrapper, an identity here: evaluation does not
    checkpoint) are stubbed; on CPU detrex runs its own PyTorch deformable attention."""

    def unavailable(*args, **kwargs):
        raise RuntimeError("stubbed for the fixture: not used by detrex's DINO in evaluation")

    for name in ("detrex._C", "wandb", "einops", "fairscale", "fairscale.nn", "fairscale.nn.checkpoint"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["einops"].rearrange = sys.modules["einops"].repeat = unavailable
    sys.modules["fairscale.nn.checkpoint"].checkpoint_wrapper = lambda module: module
    sys.path[:0] = [str(checkout), str(checkout / "projects")]
    from detrex.layers import PositionEmbeddingSine
    from detrex.modeling import ChannelMapper, HungarianMatcher
    from detrex.modeling.backbone import FocalNet
    from dino.modeling import DINO, DINOCriterion, DINOTransformer, DINOTransformerDecoder, DINOTransformerEncoder

    return types.SimpleNamespace(**locals())


def build_detrex(detrex: types.SimpleNamespace, args: argparse.Namespace) -> torch.nn.Module:
    """detrex's ``dino_focalnet_large_lrf_384_4scale_12ep`` model (``configs/models/dino_r50.py`` +
    ``dino_focalnet.py``) with the tiny sizes of the official 4-scale fixture model."""
    from detectron2.layers import ShapeSpec

    levels = args.return_interm_indices
    backbone = detrex.FocalNet(
        embed_dim=BACKBONE["embed_dim"], depths=BACKBONE["depths"], focal_levels=[args.focal_levels] * 4,
        focal_windows=[args.focal_windows] * 4, use_conv_embed=True, use_postln=True, use_postln_in_modulation=False,
        use_layerscale=True, normalize_modulator=False, out_indices=tuple(levels), drop_path_rate=0.0,
    )
    neck = detrex.ChannelMapper(
        input_shapes={f"p{i}": ShapeSpec(channels=BACKBONE["embed_dim"] * 2**i) for i in levels},
        in_features=[f"p{i}" for i in levels], out_channels=args.hidden_dim, num_outs=args.num_feature_levels,
        kernel_size=1, norm_layer=torch.nn.GroupNorm(num_groups=32, num_channels=args.hidden_dim),
    )
    sizes = {"embed_dim": args.hidden_dim, "num_heads": args.nheads, "feedforward_dim": args.dim_feedforward,
             "attn_dropout": 0.0, "ffn_dropout": 0.0, "num_feature_levels": args.num_feature_levels}
    transformer = detrex.DINOTransformer(
        encoder=detrex.DINOTransformerEncoder(num_layers=args.enc_layers, post_norm=False, **sizes),
        decoder=detrex.DINOTransformerDecoder(num_layers=args.dec_layers, return_intermediate=True, **sizes),
        num_feature_levels=args.num_feature_levels, two_stage_num_proposals=args.num_queries,
    )
    matcher = detrex.HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0, cost_class_type="focal_loss_cost")
    criterion = detrex.DINOCriterion(num_classes=80, matcher=matcher, weight_dict={"loss_class": 1, "loss_bbox": 5.0,
                                                                                  "loss_giou": 2.0})
    model = detrex.DINO(
        backbone=backbone,
        position_embedding=detrex.PositionEmbeddingSine(num_pos_feats=args.hidden_dim // 2, temperature=10000,
                                                        normalize=True, offset=-0.5),
        neck=neck, transformer=transformer, embed_dim=args.hidden_dim, num_classes=80, num_queries=args.num_queries,
        criterion=criterion, aux_loss=True, select_box_nums_for_evaluation=args.num_select, device="cpu",
        dn_number=args.dn_number, label_noise_ratio=args.dn_label_noise_ratio, box_noise_scale=1.0,
    )
    # the normaliser in the model's dtype (detrex keeps float32 constants in a lambda)
    mean = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float64).view(3, 1, 1)
    model.normalizer = lambda x: (x - mean) / std
    return model


@torch.no_grad()
def detrex_state_dict(model: torch.nn.Module, official_state: dict[str, torch.Tensor], coco_ids: list[int],
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
    """detrex weights from the official 4-scale fixture model: the same tensor wherever the two hold the same
    parameter (found through both layouts' mappings to our names), COCO's 80 rows of the class tensors,
    per-layer heads made to differ (their last layers), and detrex's own tensors where shapes differ
    (4 sampling points) perturbed like the official ones."""
    sys.path.insert(0, str(PROJECT))  # this checkout's focalnet_pl
    from focalnet_pl.dino.layouts import DetrexDINOLayout, OfficialDINOLayout

    dec_layers = len(model.transformer.decoder.layers)
    official_to_ours = OfficialDINOLayout().key_map(list(official_state), dec_layers, share_heads=False)
    by_ours = {ours: official_state[key] for key, ours in official_to_ours.items() if ours is not None}
    detrex_to_ours = DetrexDINOLayout().key_map(list(model.state_dict()), dec_layers, share_heads=False)
    state, by_storage = {}, {}
    for key, value in model.state_dict().items():
        tie = (value.data_ptr(), tuple(value.shape))
        if tie in by_storage:
            state[key] = by_storage[tie]
            continue
        ours = detrex_to_ours[key]
        source = by_ours.get(ours)
        if source is not None and re.search(r"class_head|label_embedding", ours):
            source = source[coco_ids].clone()
        if source is None or source.shape != value.shape:
            noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
            source = (value.double() + 0.5 * max(float(value.double().std()), 0.02) * noise).to(STORAGE_DTYPE)
        if re.match(r"(transformer\.decoder\.)?(class_embed\.\d+\.|bbox_embed\.\d+\.layers\.2\.)", key):
            noise = 0.2 * torch.randn(value.shape, generator=generator, dtype=torch.float64)
            source = (source.double() + noise).to(STORAGE_DTYPE)  # each layer's head its own
        by_storage[tie] = state[key] = source
    return state


@torch.no_grad()
def run_detrex_case(model: torch.nn.Module, images: list[torch.Tensor]) -> dict:
    """detrex's per-layer outputs (captured from its aux-loss stacking) and selected encoder proposals."""
    captured = {}
    model._set_aux_loss = lambda classes, coords: captured.update(logits=classes, boxes=coords) or []
    handle = model.transformer.register_forward_hook(lambda module, inputs, output: captured.update(encoder=output[3:]))
    model([{"image": image.to(torch.float64), "height": image.shape[1], "width": image.shape[2]} for image in images])
    handle.remove()
    enc_state, enc_boxes = captured["encoder"]
    return {
        "images": images,
        "pred_logits": captured["logits"],
        "pred_boxes": captured["boxes"],
        "interm_logits": model.transformer.decoder.class_embed[-1](enc_state),
        "interm_boxes": enc_boxes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="a checkout of the official FocalNet-DINO repository")
    parser.add_argument("--detrex", type=Path, help="a checkout of detrex (adds the detrex-layout fixture)")
    parser.add_argument("--output", type=Path, default=PROJECT / "tests/fixtures/dino_official.pt")
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
    if cli.detrex is not None:
        detrex = import_detrex(cli.detrex.resolve())
        args = fixture["fl3"]["checkpoint"]["args"]
        torch.manual_seed(SEED + len(CONFIGS))
        model = build_detrex(detrex, args)
        coco_ids = sorted(int(i) for i in json.loads((cli.checkout / "util/coco_id2name.json").read_text()))
        state = detrex_state_dict(model, fixture["fl3"]["checkpoint"]["model"], coco_ids,
                                  torch.Generator().manual_seed(SEED + len(CONFIGS)))
        model.double().eval()
        model.load_state_dict({k: v.double() for k, v in state.items()})
        fixture["detrex"] = {
            "checkpoint": {"model": state, "iteration": 89999},
            "architecture": fixture["fl3"]["architecture"],
            "args": args,
            "cases": [run_detrex_case(model, case_images) for case_images in images if len(case_images) == 1],
        }
        print(f"detrex: {len(state)} tensors, {len(fixture['detrex']['cases'])} cases")
    cli.output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, cli.output)
    print(f"wrote {cli.output} ({cli.output.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

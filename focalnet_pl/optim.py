"""Optimizer parameter groups and learning-rate schedules shared by the tasks."""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Literal

from torch import nn

#: substrings of parameter names that never get weight decay
NO_DECAY_KEYWORDS = ("gamma_1", "gamma_2", "pos_embed", "level_embed", "query_embed", "absolute_pos", "relative_position")


def is_no_decay(name: str, param: nn.Parameter, keywords: Iterable[str] = NO_DECAY_KEYWORDS) -> bool:
    """Norm weights, biases (all 1-d tensors), layerscale and embedding tables get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or any(k in name for k in keywords)


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    keywords: Iterable[str] = NO_DECAY_KEYWORDS,
    decay_all: bool = False,
) -> list[dict]:
    """AdamW groups: ``decay`` / ``no_decay``, optionally split further by name prefix with an lr scale.

    ``lr_scale`` maps a name prefix (e.g. ``"backbone."``) to a multiplier of the base lr; each group
    carries ``lr_scale`` so schedules can keep the ratio. ``decay_all`` puts weight decay on every
    parameter (no ``no_decay`` groups). Frozen parameters are skipped. Group ``name`` fields make the
    grouping inspectable (and testable).
    """
    lr_scale = lr_scale or {}
    keywords = tuple(keywords)
    groups: dict[tuple[str, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        prefix = next((p for p in lr_scale if name.startswith(p)), "")
        no_decay = not decay_all and is_no_decay(name, param, keywords)
        key = (prefix, no_decay)
        if key not in groups:
            groups[key] = {
                "name": f"{prefix or 'default'}{'/no_decay' if no_decay else '/decay'}",
                "params": [], "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": lr_scale.get(prefix, 1.0),
            }
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return list(groups.values())


#: module types whose parameters detectron2 / Mask2Former's ``build_optimizer`` treat as normalisation
NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)


def module_type_param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: dict[str, float] | None = None,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> list[dict]:
    """AdamW groups by the rule of Mask2Former's ``train_net.py`` (``build_optimizer``).

    Every parameter gets ``weight_decay``, biases included, except: parameters of normalisation
    layers (:data:`NORM_MODULE_TYPES`) get ``weight_decay_norm``, of ``nn.Embedding`` (learned queries,
    level embeddings) ``weight_decay_embed``, and Swin's ``relative_position_bias_table`` /
    ``absolute_pos_embed`` 0. Plain ``nn.Parameter`` s such as the pixel decoder's level embedding decay.
    ``lr_scale`` and the group fields are as in :func:`param_groups`; groups are named by prefix and decay.
    """
    lr_scale = lr_scale or {}
    groups: dict[tuple[str, float], dict] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{param_name}" if module_name else param_name
            decay = weight_decay
            if "relative_position_bias_table" in param_name or "absolute_pos_embed" in param_name:
                decay = 0.0
            if isinstance(module, NORM_MODULE_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = weight_decay_embed
            prefix = next((p for p in lr_scale if name.startswith(p)), "")
            key = (prefix, decay)
            if key not in groups:
                groups[key] = {
                    "name": f"{prefix or 'default'}/weight_decay={decay:g}",
                    "params": [], "param_names": [], "weight_decay": decay, "lr_scale": lr_scale.get(prefix, 1.0),
                }
            groups[key]["params"].append(param)
            groups[key]["param_names"].append(name)
    return list(groups.values())


def detector_param_groups(
    model: nn.Module,
    rule: Literal["by_name", "by_module_type"],
    lr: float,
    weight_decay: float,
    backbone_types: tuple[type[nn.Module], ...] = (),
    backbone_lr: float | None = None,
    *,
    decay_all: bool = False,
    weight_decay_norm: float = 0.0,
    weight_decay_embed: float = 0.0,
) -> list[dict]:
    """AdamW groups of a detector by ``rule`` (``by_name``: :func:`param_groups` with ``decay_all``;
    ``by_module_type``: :func:`module_type_param_groups` with ``weight_decay_norm`` / ``weight_decay_embed``),
    each with its ``lr``: the modules of ``backbone_types`` get ``backbone_lr`` (``None``: ``lr``)."""
    backbone_lr = backbone_lr if backbone_lr is not None else lr
    lr_scale = {f"{name}.": backbone_lr / lr for name, m in model.named_modules() if isinstance(m, backbone_types)}
    if rule == "by_module_type":
        groups = module_type_param_groups(model, weight_decay, lr_scale, weight_decay_norm, weight_decay_embed)
    else:
        groups = param_groups(model.named_parameters(), weight_decay, lr_scale, decay_all=decay_all)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return groups


def lr_factor(
    step: int,
    epoch: int = 0,
    *,
    decay: Literal["step", "poly", "cosine"] = "step",
    warmup_steps: int = 0,
    warmup_factor: float = 1.0,
    decay_epochs: Sequence[int] = (),
    decay_factor: float = 0.1,
    total_steps: int = 1,
    power: float = 0.9,
    min_factor: float = 0.0,
) -> float:
    """Multiplier of the base learning rates at optimizer ``step`` (0-based) during ``epoch``: the schedule
    of every task (``torch.optim.lr_scheduler.LambdaLR`` over it).

    A linear warmup from ``warmup_factor`` to 1 over ``warmup_steps`` multiplies one of the decays:

    * ``step``: ``decay_factor`` once more from each of ``decay_epochs`` on (mmdetection / detectron2);
    * ``poly``: ``(1 - step / total_steps) ** power`` (Mask2Former's ADE20K recipes);
    * ``cosine``: from 1 after the warmup down to ``min_factor`` at ``total_steps`` (the FocalNet paper's).
    """
    if decay == "step":
        factor = decay_factor ** sum(epoch >= e for e in decay_epochs)
    elif decay == "poly":
        factor = max(0.0, 1.0 - step / max(1, total_steps)) ** power
    elif decay == "cosine":
        progress = min(1.0, max(0, step - warmup_steps) / max(1, total_steps - warmup_steps))
        factor = min_factor + 0.5 * (1.0 - min_factor) * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown learning-rate decay {decay!r}; use 'step', 'poly' or 'cosine'")
    if step < warmup_steps:
        alpha = step / warmup_steps
        factor *= warmup_factor * (1 - alpha) + alpha
    return factor

"""Optimizer parameter groups and learning-rate schedules shared by the tasks."""
from __future__ import annotations

import math
from collections.abc import Iterable

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


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, base_lr: float, warmup_lr: float, min_lr: float) -> float:
    """Learning rate at ``step``: linear from ``warmup_lr`` to ``base_lr``, then cosine down to ``min_lr``."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))

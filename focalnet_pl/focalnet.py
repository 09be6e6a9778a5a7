"""Focal Modulation Networks (Yang et al., NeurIPS 2022): one implementation for every task.

Tokens are kept channels-last, ``(B, H, W, C)``, through the whole network: linear layers and
LayerNorms act on the last dimension without copies, and the depthwise focal convolutions see the
same memory as an NCHW tensor in ``channels_last`` format (a permute, not a copy).

Module and parameter names follow the official release (microsoft/FocalNet), so its checkpoints
load without renaming; :mod:`focalnet_pl.weights` converts the timm and Hugging Face layouts.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from focalnet_pl import cpu_fastpath
from focalnet_pl.layers.padding import downsample_mask, masked_mean, zero_padding


@dataclass(frozen=True)
class FocalNetConfig:
    """Architecture of one FocalNet variant (the columns of the paper's model table)."""

    embed_dim: int = 96
    depths: tuple[int, ...] = (2, 2, 6, 2)
    focal_levels: tuple[int, ...] = (2, 2, 2, 2)
    focal_windows: tuple[int, ...] = (3, 3, 3, 3)
    focal_factor: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 4
    use_conv_embed: bool = False
    use_postln: bool = False
    use_postln_in_modulation: bool = False
    normalize_modulator: bool = False
    use_layerscale: bool = False
    layerscale_value: float = 1e-4
    drop_path_rate: float = 0.2
    drop_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("depths", "focal_levels", "focal_windows"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        n = len(self.depths)
        if len(self.focal_levels) != n or len(self.focal_windows) != n:
            raise ValueError(
                f"depths, focal_levels and focal_windows need one entry per stage; got "
                f"{self.depths}, {self.focal_levels}, {self.focal_windows}"
            )

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stage_dims(self) -> list[int]:
        return [self.embed_dim * 2**i for i in range(self.num_stages)]


def _large_plus(embed_dim: int, focal_level: int, focal_window: int, **extra) -> FocalNetConfig:
    return FocalNetConfig(
        embed_dim=embed_dim, depths=(2, 2, 18, 2), focal_levels=(focal_level,) * 4,
        focal_windows=(focal_window,) * 4, use_conv_embed=True, use_postln=True,
        use_layerscale=True, drop_path_rate=0.5, **extra,
    )


#: The twelve released variants. Settings follow the official configs (configs/focalnet_*.yaml of
#: microsoft/FocalNet); drop_path_rate is the ImageNet training value of those configs.
#: ``normalize_modulator`` is set only where the official YAML sets it (large_fl4). timm leaves it
#: off for every model: pass ``normalize_modulator=...`` to :func:`create_focalnet` to change it.
VARIANTS: dict[str, FocalNetConfig] = {
    "focalnet_tiny_srf": FocalNetConfig(96, (2, 2, 6, 2), (2,) * 4, drop_path_rate=0.2),
    "focalnet_tiny_lrf": FocalNetConfig(96, (2, 2, 6, 2), (3,) * 4, drop_path_rate=0.2),
    "focalnet_small_srf": FocalNetConfig(96, (2, 2, 18, 2), (2,) * 4, drop_path_rate=0.3),
    "focalnet_small_lrf": FocalNetConfig(96, (2, 2, 18, 2), (3,) * 4, drop_path_rate=0.3),
    "focalnet_base_srf": FocalNetConfig(128, (2, 2, 18, 2), (2,) * 4, drop_path_rate=0.5),
    "focalnet_base_lrf": FocalNetConfig(128, (2, 2, 18, 2), (3,) * 4, drop_path_rate=0.5),
    "focalnet_large_fl3": _large_plus(192, 3, 5),
    "focalnet_large_fl4": _large_plus(192, 4, 3, normalize_modulator=True),
    "focalnet_xlarge_fl3": _large_plus(256, 3, 5),
    "focalnet_xlarge_fl4": _large_plus(256, 4, 3),
    "focalnet_huge_fl3": _large_plus(352, 3, 3, use_postln_in_modulation=True),
    "focalnet_huge_fl4": _large_plus(352, 4, 3, use_postln_in_modulation=True),
}


def list_variants() -> list[str]:
    """Names accepted by :func:`create_focalnet`."""
    return list(VARIANTS)


def variant_config(name: str, **overrides) -> FocalNetConfig:
    """The config of variant ``name`` with ``overrides`` applied (unknown names raise)."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown FocalNet variant {name!r}. Valid names: {', '.join(VARIANTS)}")
    fields = set(asdict(VARIANTS[name]))
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"Unknown FocalNet config key(s) {unknown} for {name!r}. Valid keys: {sorted(fields)}")
    return replace(VARIANTS[name], **overrides)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class FocalModulation(nn.Module):
    """Focal modulation: query x (hierarchical, gated context aggregation), on ``(B, H, W, C)``.

    ``f`` gives query, context and ``focal_level + 1`` gates; each focal level is a depthwise conv
    (kernel ``focal_factor * l + focal_window``) + GELU applied to the previous level; the global
    level is GELU(mean of the last level). ``h`` (a 1x1 conv, here a linear layer) turns the gated
    sum into the modulator.

    With a padding mask ``(B, H, W)`` (True at padding), padded positions are zeroed before each focal
    convolution and the global level averages the valid positions only: the valid positions' output
    does not depend on the padding (see :mod:`focalnet_pl.layers.padding`).
    """

    def __init__(
        self,
        dim: int,
        focal_level: int,
        focal_window: int,
        focal_factor: int = 2,
        proj_drop: float = 0.0,
        use_postln_in_modulation: bool = False,
        normalize_modulator: bool = False,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.focal_level = focal_level
        self.normalize_modulator = normalize_modulator
        self.f = nn.Linear(dim, 2 * dim + focal_level + 1)
        self.h = nn.Linear(dim, dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.kernel_sizes = [focal_factor * k + focal_window for k in range(focal_level)]
        self.focal_layers = nn.ModuleList(
            nn.Sequential(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False), nn.GELU())
            for k in self.kernel_sizes
        )
        self.ln = nn.LayerNorm(dim) if use_postln_in_modulation else None
        #: set by :meth:`forward` when ``record_maps`` is True (for modulation-map visualisation)
        self.record_maps = False
        self.last_gates: torch.Tensor | None = None
        self.last_modulator: torch.Tensor | None = None

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``f(x)`` split into query and gates ``(B, H, W, .)`` and the context as channels-last NCHW
        (the NHWC memory seen as NCHW: the depthwise convs run without layout copies)."""
        C = self.dim
        if cpu_fastpath.projection_applies(self.f, x):
            B, H, W, _ = x.shape
            q, ctx, gates = cpu_fastpath.FocalProjection.apply(x.reshape(-1, C), self.f.weight, self.f.bias, C)
            return q.view(B, H, W, C), ctx.view(B, H, W, C).permute(0, 3, 1, 2), gates.view(B, H, W, -1)
        qcg = self.f(x)
        ctx = qcg[..., C : 2 * C].permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        return qcg[..., :C], ctx, qcg[..., 2 * C :]

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, ctx, gates = self._project(x)
        ctx_all = None
        for level, layer in enumerate(self.focal_layers):
            ctx = layer(zero_padding(ctx, padding_mask))
            term = ctx.permute(0, 2, 3, 1) * gates[..., level : level + 1]
            ctx_all = term if ctx_all is None else ctx_all + term
        ctx_global = self.act(masked_mean(ctx, padding_mask))[:, None, None, :]
        term = ctx_global * gates[..., self.focal_level :]
        ctx_all = term if ctx_all is None else ctx_all + term
        if self.normalize_modulator:
            ctx_all = ctx_all / (self.focal_level + 1)
        modulator = self.h(ctx_all)
        if self.record_maps:
            self.last_gates = gates.detach()
            self.last_modulator = modulator.detach()
        out = q * modulator
        if self.ln is not None:
            out = self.ln(out)
        return self.proj_drop(self.proj(out))


class FocalNetBlock(nn.Module):
    """Pre-LN (default) or post-LN residual block: modulation, then MLP, each with optional layerscale."""

    def __init__(self, dim: int, cfg: FocalNetConfig, focal_level: int, focal_window: int, drop_path: float) -> None:
        super().__init__()
        self.use_postln = cfg.use_postln
        self.norm1 = nn.LayerNorm(dim)
        self.modulation = FocalModulation(
            dim, focal_level, focal_window, cfg.focal_factor, cfg.drop_rate,
            cfg.use_postln_in_modulation, cfg.normalize_modulator,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.drop_rate)
        if cfg.use_layerscale:
            self.gamma_1 = nn.Parameter(torch.full((dim,), cfg.layerscale_value))
            self.gamma_2 = nn.Parameter(torch.full((dim,), cfg.layerscale_value))
        else:
            self.gamma_1 = self.gamma_2 = None

    @staticmethod
    def _scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return x if gamma is None else x * gamma

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, H, W, C)``; ``padding_mask (B, H, W)`` True at padding (see :class:`FocalModulation`)."""
        if cpu_fastpath.applies(self, x):
            return cpu_fastpath.block_forward(self, x, padding_mask=padding_mask)
        if self.use_postln:
            x = x + self.drop_path(self._scale(self.norm1(self.modulation(x, padding_mask)), self.gamma_1))
            return x + self.drop_path(self._scale(self.norm2(self.mlp(x)), self.gamma_2))
        x = x + self.drop_path(self._scale(self.modulation(self.norm1(x), padding_mask), self.gamma_1))
        return x + self.drop_path(self._scale(self.mlp(self.norm2(x)), self.gamma_2))


class PatchEmbed(nn.Module):
    """Strided conv embedding (stem: stride 4; between stages: stride 2) + LayerNorm, NCHW in, NHWC out.

    Inputs whose size is not a multiple of the stride are zero-padded on the right/bottom.
    ``use_conv_embed`` selects the overlapping 7x7/3x3 convolutions of the large models.
    """

    def __init__(self, in_chans: int, embed_dim: int, stride: int, use_conv_embed: bool) -> None:
        super().__init__()
        self.stride = stride
        if use_conv_embed:
            kernel, padding = (7, 2) if stride == 4 else (3, 1)
        else:
            kernel, padding = stride, 0
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % self.stride, (-w) % self.stride
        # traced (torch.export / ONNX, dynamic shapes): pad unconditionally so the graph fits every size
        if torch.compiler.is_compiling() or pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class FocalNetStage(nn.Module):
    """The blocks of one resolution, followed by the downsampling embedding of the next stage."""

    def __init__(self, dim: int, out_dim: int | None, depth: int, cfg: FocalNetConfig,
                 focal_level: int, focal_window: int, drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            FocalNetBlock(dim, cfg, focal_level, focal_window, drop_paths[i]) for i in range(depth)
        )
        self.downsample = PatchEmbed(dim, out_dim, 2, cfg.use_conv_embed) if out_dim else None
        self.grad_checkpointing = False

    def forward_blocks(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, padding_mask, use_reentrant=False)
            else:
                x = block(x, padding_mask)
        return x

    def forward_downsample(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.downsample is None:
            return x
        return self.downsample(zero_padding(x.permute(0, 3, 1, 2), padding_mask))


class FocalNet(nn.Module):
    """FocalNet classifier (``features_only=False``) or dense multi-scale backbone (``features_only=True``).

    Classifier: ``forward(x) -> logits``; ``forward_features(x) -> (B, H/32, W/32, C)`` after the
    final norm; ``forward_head(features)`` pools and classifies.

    Dense backbone: ``forward(x) -> list`` of NCHW maps for ``out_indices`` (strides ``4 * 2**i``),
    each through its own LayerNorm ``norm{i}``; any input size (padded internally); stages
    ``<= frozen_stages`` (0 = stem) are frozen and kept in eval mode.

    ``padding_mask`` ``(B, H, W)`` (True where a batched image is padding): padded positions are zeroed
    before every convolution and left out of the global context means, and the dense maps are zero
    there, so each image's features are those it has alone. Without it (the official models), the
    padding is computed on like image content.
    """

    def __init__(
        self,
        cfg: FocalNetConfig,
        num_classes: int = 1000,
        in_chans: int = 3,
        features_only: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.features_only = features_only
        dims = cfg.stage_dims
        self.num_features = dims[-1]
        self.patch_embed = PatchEmbed(in_chans, dims[0], cfg.patch_size, cfg.use_conv_embed)
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        starts = [sum(cfg.depths[:i]) for i in range(cfg.num_stages)]
        self.layers = nn.ModuleList(
            FocalNetStage(
                dims[i], dims[i + 1] if i + 1 < cfg.num_stages else None, cfg.depths[i], cfg,
                cfg.focal_levels[i], cfg.focal_windows[i], rates[starts[i] : starts[i] + cfg.depths[i]],
            )
            for i in range(cfg.num_stages)
        )
        if features_only:
            self.out_indices = tuple(sorted(out_indices))
            bad = [i for i in self.out_indices if not 0 <= i < cfg.num_stages]
            if bad:
                raise ValueError(f"out_indices {bad} out of range for {cfg.num_stages} stages")
            for i in self.out_indices:
                self.add_module(f"norm{i}", nn.LayerNorm(dims[i]))
            self.out_channels = [dims[i] for i in self.out_indices]
            self.out_strides = [cfg.patch_size * 2**i for i in self.out_indices]
            self.num_classes = 0
        else:
            self.norm = nn.LayerNorm(self.num_features)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
            self.num_classes = num_classes
        self.frozen_stages = frozen_stages
        self.apply(self._init_weights)
        self.set_grad_checkpointing(grad_checkpointing)
        self._freeze_stages()

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in backward (saves memory on large models)."""
        for stage in self.layers:
            stage.grad_checkpointing = enable

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.patch_embed]
        for i in range(min(self.frozen_stages, len(self.layers))):
            modules.append(self.layers[i])
        return modules

    def _freeze_stages(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> FocalNet:
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def no_weight_decay_keywords(self) -> set[str]:
        """Substrings of parameter names that get no weight decay (besides 1-d params and biases)."""
        return {"gamma_1", "gamma_2"}

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.patch_embed.proj.in_channels:
            raise ValueError(
                f"FocalNet expects images of shape (B, {self.patch_embed.proj.in_channels}, H, W); "
                f"got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"FocalNet expects a floating-point image tensor; got dtype {x.dtype}")

    def _check_mask(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        if padding_mask is not None and (padding_mask.dtype != torch.bool or padding_mask.shape != (x.shape[0], *x.shape[2:])):
            raise ValueError(
                f"padding_mask must be a bool tensor of shape {(x.shape[0], *x.shape[2:])} (B, H, W) for images "
                f"{tuple(x.shape)}; got {padding_mask.dtype} {tuple(padding_mask.shape)}"
            )

    def forward_features(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> torch.Tensor | list[torch.Tensor]:
        self._check_input(x)
        self._check_mask(x, padding_mask)
        if padding_mask is not None and not self.features_only:
            raise ValueError("padding_mask is for the dense backbone (features_only=True); classify images one size at a time")
        mask = None if padding_mask is None else downsample_mask(padding_mask, self.cfg.patch_size)
        x = self.pos_drop(self.patch_embed(zero_padding(x, padding_mask)))
        if self.features_only:
            outs = []
            for i, stage in enumerate(self.layers):
                x = stage.forward_blocks(x, mask)
                if i in self.out_indices:
                    outs.append(zero_padding(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2), mask).contiguous())
                if i == self.out_indices[-1]:
                    break
                x = stage.forward_downsample(x, mask)
                mask = None if mask is None else downsample_mask(mask, 2)
            return outs
        for stage in self.layers:
            x = stage.forward_downsample(stage.forward_blocks(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor | list[torch.Tensor]:
        features = self.forward_features(x, padding_mask)
        return features if self.features_only else self.forward_head(features)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for ``num_classes`` classes."""
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(self._init_weights)

    def modulation_layers(self) -> list[tuple[int, int, FocalModulation]]:
        """``(stage, block, module)`` for every focal modulation, in forward order."""
        return [(s, b, blk.modulation) for s, st in enumerate(self.layers) for b, blk in enumerate(st.blocks)]


def create_focalnet(
    name: str,
    *,
    num_classes: int = 1000,
    weights: str | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    frozen_stages: int = -1,
    grad_checkpointing: bool = False,
    strict: bool = True,
    **overrides,
) -> FocalNet:
    """Build a FocalNet variant by name.

    Args:
        name: one of :func:`list_variants`.
        num_classes: classifier outputs (ignored with ``features_only``).
        weights: checkpoint path, https URL or ``zoo:NAME`` (``focalnet-pl zoo``) in the official,
            timm, Hugging Face or focalnet-pl layout (``.safetensors`` or a torch pickle read with
            ``weights_only=True``). What was loaded, mapped, re-initialised or ignored is logged and
            kept as ``model.weights_report`` (:class:`~focalnet_pl.weights.LoadReport`).
        features_only: return the dense multi-scale backbone instead of the classifier.
        out_indices, frozen_stages, grad_checkpointing: dense-mode options (see :class:`FocalNet`).
        strict: with ``weights``, raise on missing/unexpected/wrong-shape keys (the classifier head
            and focal-level expansion are handled and reported, not errors).
        **overrides: fields of :class:`FocalNetConfig` (e.g. ``drop_path_rate=0.3``,
            ``embed_dim=32``, ``depths=(1, 1, 2, 1)``).
    """
    cfg = variant_config(name, **overrides)
    model = FocalNet(cfg, num_classes=num_classes, features_only=features_only, out_indices=out_indices,
                     frozen_stages=frozen_stages, grad_checkpointing=grad_checkpointing)
    if weights is not None:
        from focalnet_pl.weights import load_weights

        model.weights_report = load_weights(model, weights, strict=strict)
        model._freeze_stages()
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = [
    "VARIANTS", "FocalNet", "FocalNetConfig", "FocalModulation", "create_focalnet", "list_variants",
    "variant_config", "count_parameters",
]

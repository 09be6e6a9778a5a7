"""FocalNet as a detectron2 backbone (``BACKBONE_REGISTRY``): bare, and under detectron2's FPN."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool

from focalnet_pl.focalnet import create_focalnet
from focalnet_pl.layers.padding import downsample_mask, replicate_padding, zero_padding

__all__ = ["FocalNetBackbone", "PaddingMaskedFPN", "build_focalnet_backbone", "build_focalnet_fpn_backbone"]

#: detectron2 feature names of the four FocalNet stages (strides 4, 8, 16, 32).
STAGE_NAMES: tuple[str, ...] = ("res2", "res3", "res4", "res5")


class FocalNetBackbone(Backbone):
    """Multi-scale FocalNet features as a detectron2 :class:`Backbone`.

    Args:
        variant: FocalNet variant name (see :func:`focalnet_pl.list_variants`).
        out_features: subset of ``res2``..``res5`` (strides 4..32) to return.
        frozen_stages: stages ``<= frozen_stages`` get no gradient and stay in eval mode
            (0 = patch embedding, -1 = nothing frozen).
        grad_checkpointing: recompute block activations in backward to save memory.
        weights: classification checkpoint loaded into the backbone (``None``: random init).
        **overrides: fields of :class:`focalnet_pl.focalnet.FocalNetConfig` (``drop_path_rate``,
            ``embed_dim``, ``depths``, ...).
    """

    def __init__(
        self,
        variant: str,
        out_features: Sequence[str] = STAGE_NAMES,
        frozen_stages: int = -1,
        grad_checkpointing: bool = False,
        weights: str | None = None,
        **overrides,
    ) -> None:
        super().__init__()
        unknown = [name for name in out_features if name not in STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"FocalNet out_features must be a non-empty subset of {STAGE_NAMES}; got {list(out_features)}")
        self._out_features = sorted(set(out_features), key=STAGE_NAMES.index)
        out_indices = tuple(STAGE_NAMES.index(name) for name in self._out_features)
        self.body = create_focalnet(
            variant, features_only=True, out_indices=out_indices, frozen_stages=frozen_stages,
            grad_checkpointing=grad_checkpointing, weights=weights, **overrides,
        )
        self._out_feature_channels = dict(zip(self._out_features, self.body.out_channels))
        self._out_feature_strides = dict(zip(self._out_features, self.body.out_strides))

    @property
    def size_divisibility(self) -> int:
        """Batched images are padded to a multiple of the coarsest stride."""
        return 32

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``x (B, 3, H, W)``; ``padding_mask (B, H, W)`` True at padding: features as each image alone
        (zero at padding; see :class:`focalnet_pl.focalnet.FocalNet`)."""
        return dict(zip(self._out_features, self.body(x, padding_mask)))

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }


def _focalnet_kwargs(cfg: CfgNode) -> dict:
    node = cfg.MODEL.FOCALNET
    kwargs: dict = {
        "variant": node.VARIANT,
        "out_features": list(node.OUT_FEATURES),
        "frozen_stages": node.FROZEN_STAGES,
        "grad_checkpointing": node.GRAD_CHECKPOINTING,
        "weights": node.WEIGHTS or None,
        "drop_path_rate": node.DROP_PATH_RATE,
    }
    if node.EMBED_DIM > 0:
        kwargs["embed_dim"] = node.EMBED_DIM
    for key, field in (("DEPTHS", "depths"), ("FOCAL_LEVELS", "focal_levels"), ("FOCAL_WINDOWS", "focal_windows")):
        if len(node[key]) > 0:
            kwargs[field] = tuple(node[key])
    return kwargs


class PaddingMaskedFPN(FPN):
    """detectron2's FPN that, given the padding of the batch, computes each image as if alone.

    detectron2's meta-architectures call the backbone with the padded images only, so the padding mask
    comes through :attr:`padding_mask`, set for the next forward (by
    :class:`focalnet_pl.d2.rcnn.PaddingMaskedRCNN`) and cleared by it. With a mask, the bottom-up
    features and every output convolution's input are zero at padding, and each output map holds, at
    padding, the nearest valid value (what ROIAlign reads at the border of an unpadded map; the RPN
    zeroes it again before its convolution). Without one it is detectron2's FPN.
    """

    #: ``(B, H, W)`` padding mask for the next forward (True at padding); cleared by that forward
    padding_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        mask, self.padding_mask = self.padding_mask, None
        if mask is None:
            return super().forward(x)
        if any(conv.norm is not None for conv in (*self.lateral_convs, *self.output_convs)):
            raise NotImplementedError("MODEL.MASK_PADDING with MODEL.FPN.NORM: normalisation over the valid region only "
                                      "is not implemented for the FPN; set MODEL.FPN.NORM '' or MODEL.MASK_PADDING False")
        bottom_up = self.bottom_up(x, mask)
        strides = [self.bottom_up.output_shape()[name].stride for name in self.in_features]
        masks = [downsample_mask(mask, stride) for stride in strides]
        results = []
        previous = None
        for level in range(len(self.in_features) - 1, -1, -1):
            index = len(self.in_features) - 1 - level  # lateral/output convs are ordered coarse to fine
            lateral = self.lateral_convs[index](bottom_up[self.in_features[level]])
            if previous is not None:
                lateral = lateral + F.interpolate(previous, scale_factor=2.0, mode="nearest")
                if self._fuse_type == "avg":
                    lateral = lateral / 2
            previous = lateral
            output = self.output_convs[index](zero_padding(lateral, masks[level]))
            results.insert(0, replicate_padding(output, masks[level]))
        if self.top_block is not None:
            if self.top_block.in_feature in bottom_up:
                top_input = bottom_up[self.top_block.in_feature]
            else:
                top_input = results[self._out_features.index(self.top_block.in_feature)]
            results.extend(self.top_block(top_input))
        return dict(zip(self._out_features, results))


@BACKBONE_REGISTRY.register()
def build_focalnet_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FocalNetBackbone:
    """``MODEL.BACKBONE.NAME: build_focalnet_backbone``: FocalNet features ``MODEL.FOCALNET.OUT_FEATURES``."""
    if input_shape.channels != 3:
        raise ValueError(f"FocalNet backbones take 3-channel images; MODEL.PIXEL_MEAN has {input_shape.channels} values")
    return FocalNetBackbone(**_focalnet_kwargs(cfg))


@BACKBONE_REGISTRY.register()
def build_focalnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> PaddingMaskedFPN:
    """``MODEL.BACKBONE.NAME: build_focalnet_fpn_backbone``: detectron2's FPN (with a max-pooled
    extra level, ``p6``) over FocalNet, as in Mask R-CNN; padding-aware (:class:`PaddingMaskedFPN`)."""
    bottom_up = build_focalnet_backbone(cfg, input_shape)
    missing = [name for name in cfg.MODEL.FPN.IN_FEATURES if name not in bottom_up.output_shape()]
    if missing:
        raise ValueError(
            f"MODEL.FPN.IN_FEATURES {list(cfg.MODEL.FPN.IN_FEATURES)} needs {missing}, which "
            f"MODEL.FOCALNET.OUT_FEATURES {list(cfg.MODEL.FOCALNET.OUT_FEATURES)} does not produce"
        )
    return PaddingMaskedFPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )

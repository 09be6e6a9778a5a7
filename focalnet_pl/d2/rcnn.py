"""Mask R-CNN whose results do not depend on the batch: ``MODEL.META_ARCHITECTURE: PaddingMaskedRCNN``.

detectron2's :class:`GeneralizedRCNN` pads the images of a batch to a common size and computes on the
padding: the backbone and FPN convolutions read it, and the RPN ranks anchors that lie in it, so an
image's detections change with the sizes of the other images in its batch (and with the batch size).
With ``MODEL.MASK_PADDING`` (default True), :class:`PaddingMaskedRCNN` gives the backbone
(:class:`~focalnet_pl.d2.backbone.PaddingMaskedFPN`) the padding mask, and :class:`PaddingMaskedRPN`
zeroes the padding before its convolution and, at inference, drops the anchors of padded cells. The
weights are those of :class:`GeneralizedRCNN` (same module names); with ``MODEL.MASK_PADDING False`` it
computes exactly as :class:`GeneralizedRCNN`.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, PROPOSAL_GENERATOR_REGISTRY, GeneralizedRCNN, build_backbone
from detectron2.modeling.proposal_generator import RPN, build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, ImageList, Instances

from focalnet_pl.layers.padding import downsample_mask, padding_mask, zero_padding

__all__ = ["PaddingMaskedRCNN", "PaddingMaskedRPN"]


def _batch_padding_mask(images: ImageList) -> torch.Tensor:
    return padding_mask(images.image_sizes, *images.tensor.shape[-2:], device=images.tensor.device)


@PROPOSAL_GENERATOR_REGISTRY.register()
class PaddingMaskedRPN(RPN):
    """detectron2's RPN that ignores the padding of the batch: its head sees zeros there, and at inference
    anchors on padded cells get no proposals (their objectness is set to -inf, which
    ``find_top_rpn_proposals`` drops)."""

    @configurable
    def __init__(self, *, mask_padding: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_padding = mask_padding

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape) -> dict:
        return {**super().from_config(cfg, input_shape), "mask_padding": cfg.MODEL.MASK_PADDING}

    def forward(self, images: ImageList, features: dict[str, torch.Tensor], gt_instances: list[Instances] | None = None):
        if self.mask_padding:
            mask = _batch_padding_mask(images)
            strides = dict(zip(self.in_features, self.anchor_generator.strides))
            features = {name: zero_padding(features[name], downsample_mask(mask, strides[name])) for name in self.in_features}
        return super().forward(images, features, gt_instances)

    def predict_proposals(self, anchors: list[Boxes], pred_objectness_logits: list[torch.Tensor],
                          pred_anchor_deltas: list[torch.Tensor], image_sizes: list[tuple[int, int]]):
        if self.mask_padding and not self.training:
            sizes = torch.tensor(image_sizes, device=pred_objectness_logits[0].device)  # (B, 2) as (h, w)
            masked = []
            for boxes, logits, stride in zip(anchors, pred_objectness_logits, self.anchor_generator.strides):
                cells = torch.div(boxes.get_centers(), stride, rounding_mode="floor")  # (A, 2) as (x, y)
                valid_cells = torch.div(sizes.flip(1) + stride - 1, stride, rounding_mode="floor")  # (B, 2) ceil
                valid = (cells[None] < valid_cells[:, None]).all(-1)  # (B, A)
                masked.append(logits.masked_fill(~valid, float("-inf")))
            pred_objectness_logits = masked
        return super().predict_proposals(anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)


@META_ARCH_REGISTRY.register()
class PaddingMaskedRCNN(GeneralizedRCNN):
    """:class:`GeneralizedRCNN` with ``MODEL.MASK_PADDING``: each image's detections are those it gets
    alone, whatever the batch (see the module docstring). The backbone must be padding-aware
    (``build_focalnet_fpn_backbone``); detectron2's ``RPN`` becomes :class:`PaddingMaskedRPN`."""

    @configurable
    def __init__(self, *, mask_padding: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mask_padding = mask_padding
        if mask_padding and not hasattr(self.backbone, "padding_mask"):
            raise ValueError(
                f"MODEL.MASK_PADDING needs a padding-aware backbone (MODEL.BACKBONE.NAME: build_focalnet_fpn_backbone); "
                f"{type(self.backbone).__name__} is not. Set MODEL.MASK_PADDING False to compute on the padding."
            )

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        backbone = build_backbone(cfg)
        if cfg.MODEL.MASK_PADDING and cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN":
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.PROPOSAL_GENERATOR.NAME = "PaddingMaskedRPN"
        return {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, backbone.output_shape()),
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "mask_padding": cfg.MODEL.MASK_PADDING,
        }

    def preprocess_image(self, batched_inputs: list[dict[str, torch.Tensor]]) -> ImageList:
        """Normalised, padded images; with ``mask_padding`` their padding mask goes to the backbone's next forward."""
        images = super().preprocess_image(batched_inputs)
        if self.mask_padding:
            self.backbone.padding_mask = _batch_padding_mask(images)
        return images

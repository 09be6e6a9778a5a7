"""Mask2Former (Cheng et al., "Masked-attention Mask Transformer for Universal Image Segmentation", 2022)
as a detectron2 meta-architecture, ``MODEL.META_ARCHITECTURE: Mask2Former``.

Training input: detectron2 dicts with ``image`` (C, H, W) and ``instances`` (``gt_classes``,
``gt_masks`` as a (N, H, W) tensor or :class:`BitMasks`); semantic labels are turned into one mask
per class by the data mapper. Inference returns, per image, any of ``sem_seg`` (K, H, W) scores,
``panoptic_seg`` ``(id map, segments_info)`` and ``instances``, at the requested ``height``/``width``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, Boxes, ImageList, Instances
from torch import Tensor, nn

from focalnet_pl.layers import PixelNormalization, downsample_mask, padding_mask, replicate_padding
from focalnet_pl.layers.precision import run_in_float32
from focalnet_pl.mask2former.criterion import MaskSetCriterion
from focalnet_pl.mask2former.matcher import HungarianMaskMatcher
from focalnet_pl.mask2former.pixel_decoder import MSDeformAttnPixelDecoder
from focalnet_pl.mask2former.transformer_decoder import MaskedAttentionDecoder

__all__ = ["Mask2Former", "semantic_inference", "panoptic_inference", "instance_inference"]


@run_in_float32
def semantic_inference(class_logits: Tensor, mask_logits: Tensor) -> Tensor:
    """(Q, K+1), (Q, H, W) -> (K, H, W) per-class scores: sum over queries of p(class) * mask probability."""
    class_probabilities = class_logits.softmax(-1)[:, :-1]
    return torch.einsum("qk,qhw->khw", class_probabilities, mask_logits.sigmoid())


@run_in_float32
def panoptic_inference(
    class_logits: Tensor,
    mask_logits: Tensor,
    thing_class_ids: set[int],
    object_mask_threshold: float = 0.8,
    overlap_threshold: float = 0.8,
) -> tuple[Tensor, list[dict[str, Any]]]:
    """Merge confident queries into a non-overlapping segment map (the official Mask2Former rule).

    Queries whose best class is not "no object" and scores above ``object_mask_threshold`` compete
    for pixels by ``score * mask probability``. A query is kept when the pixels it wins (all of them,
    inside its own mask or not) are at least ``overlap_threshold`` of its own (probability >= 0.5)
    mask; its segment is the won pixels inside its own mask. Stuff queries of the same class merge.
    Returns an int32 (H, W) map (0 = unassigned) and detectron2-style ``segments_info``.
    """
    num_classes = class_logits.shape[-1] - 1
    scores, labels = class_logits.softmax(-1).max(-1)
    keep = (labels != num_classes) & (scores > object_mask_threshold)
    scores, labels, probabilities = scores[keep], labels[keep], mask_logits[keep].sigmoid()
    height, width = mask_logits.shape[-2:]
    segment_map = torch.zeros((height, width), dtype=torch.int32, device=mask_logits.device)
    segments: list[dict[str, Any]] = []
    if probabilities.shape[0] == 0:
        return segment_map, segments
    winner = (scores[:, None, None] * probabilities).argmax(0)
    stuff_segment_of_class: dict[int, int] = {}
    for query in range(probabilities.shape[0]):
        category = int(labels[query])
        won = winner == query
        own_mask = probabilities[query] >= 0.5
        segment = won & own_mask
        won_area, own_area = int(won.sum()), int(own_mask.sum())
        if won_area == 0 or own_area == 0 or not segment.any() or won_area / own_area < overlap_threshold:
            continue
        is_thing = category in thing_class_ids
        if not is_thing and category in stuff_segment_of_class:
            segment_map[segment] = stuff_segment_of_class[category]
            continue
        segment_id = len(segments) + 1
        segment_map[segment] = segment_id
        segments.append({"id": segment_id, "isthing": is_thing, "category_id": category})
        if not is_thing:
            stuff_segment_of_class[category] = segment_id
    return segment_map, segments


@run_in_float32
def instance_inference(
    class_logits: Tensor, mask_logits: Tensor, max_detections: int, thing_class_ids: set[int] | None = None
) -> Instances:
    """Top ``max_detections`` (query, class) pairs as :class:`Instances` (``pred_masks``, ``pred_boxes``,
    ``scores`` = class probability x mean mask probability inside the mask, ``pred_classes``).
    With ``thing_class_ids`` only those classes are kept (panoptic models)."""
    num_classes = class_logits.shape[-1] - 1
    class_probabilities = class_logits.softmax(-1)[:, :-1]
    scores, flat_indices = class_probabilities.flatten().topk(min(max_detections, class_probabilities.numel()))
    labels = flat_indices % num_classes
    queries = flat_indices // num_classes
    if thing_class_ids is not None:
        is_thing = torch.tensor([int(label) in thing_class_ids for label in labels], dtype=torch.bool, device=labels.device)
        scores, labels, queries = scores[is_thing], labels[is_thing], queries[is_thing]
    selected = mask_logits[queries]
    binary = selected > 0
    mask_scores = (selected.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    result = Instances(tuple(mask_logits.shape[-2:]))
    result.pred_masks = binary
    result.pred_boxes = BitMasks(binary).get_bounding_boxes() if binary.shape[0] else Boxes(binary.new_zeros(0, 4).float())
    result.scores = scores * mask_scores
    result.pred_classes = labels
    return result


@META_ARCH_REGISTRY.register()
class Mask2Former(nn.Module):
    """Backbone -> deformable pixel decoder -> masked-attention decoder, with set-prediction losses.

    ``mask_padding`` (``MODEL.MASK_PADDING``): the padding of batched images is masked in the backbone,
    the pixel decoder (GroupNorm statistics, position embeddings, deformable attention, upsampling), the
    decoder's attention and the upsampling of the mask logits, so that each image's result does not
    depend on its batch. The official Mask2Former computes on the padding (False).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        pixel_decoder: MSDeformAttnPixelDecoder,
        transformer_decoder: MaskedAttentionDecoder,
        criterion: MaskSetCriterion,
        num_classes: int,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        size_divisibility: int,
        deep_supervision: bool,
        thing_class_ids: tuple[int, ...],
        semantic_on: bool,
        instance_on: bool,
        panoptic_on: bool,
        object_mask_threshold: float,
        overlap_threshold: float,
        detections_per_image: int,
        resize_before_inference: bool = False,
        mask_padding: bool = False,
    ) -> None:
        super().__init__()
        if not (semantic_on or instance_on or panoptic_on):
            raise ValueError("enable at least one of MODEL.MASK_FORMER.TEST.{SEMANTIC,INSTANCE,PANOPTIC}_ON")
        bad = [c for c in thing_class_ids if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"MODEL.MASK_FORMER.THING_CLASS_IDS {bad} outside [0, {num_classes})")
        self.backbone = backbone
        self.pixel_decoder = pixel_decoder
        self.transformer_decoder = transformer_decoder
        self.criterion = criterion
        self.num_classes = num_classes
        self.size_divisibility = max(size_divisibility, backbone.size_divisibility)
        self.deep_supervision = deep_supervision
        self.thing_class_ids = set(thing_class_ids)
        self.semantic_on, self.instance_on, self.panoptic_on = semantic_on, instance_on, panoptic_on
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.detections_per_image = detections_per_image
        self.mask_padding = mask_padding
        # resize the mask logits to the output size before combining them (always for panoptic / instance
        # outputs); otherwise semantic scores are combined at the input size, then resized
        self.resize_before_inference = resize_before_inference or panoptic_on or instance_on
        self.normalize = PixelNormalization(pixel_mean, pixel_std)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        head, node = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [name for name in head.IN_FEATURES if name not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IN_FEATURES {list(head.IN_FEATURES)} names {missing}, which the backbone does not "
                f"produce (it gives {sorted(shapes)})"
            )
        pixel_decoder = MSDeformAttnPixelDecoder(
            {name: shapes[name] for name in head.IN_FEATURES},
            conv_dim=head.CONVS_DIM,
            mask_dim=head.MASK_DIM,
            transformer_in_features=tuple(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            num_encoder_layers=head.TRANSFORMER_ENC_LAYERS,
            num_heads=head.DEFORMABLE_NUM_HEADS,
            num_points=head.DEFORMABLE_NUM_POINTS,
            ffn_dim=head.DEFORMABLE_DIM_FEEDFORWARD,
            dropout=node.DROPOUT,
            common_stride=head.COMMON_STRIDE,
        )
        transformer_decoder = MaskedAttentionDecoder(
            in_channels=head.CONVS_DIM,
            num_classes=head.NUM_CLASSES,
            hidden_dim=node.HIDDEN_DIM,
            num_queries=node.NUM_OBJECT_QUERIES,
            num_heads=node.NHEADS,
            ffn_dim=node.DIM_FEEDFORWARD,
            num_layers=node.DEC_LAYERS,
            mask_dim=head.MASK_DIM,
            num_feature_levels=pixel_decoder.num_output_levels,
            dropout=node.DROPOUT,
            enforce_input_projection=node.ENFORCE_INPUT_PROJ,
        )
        matcher = HungarianMaskMatcher(node.CLASS_WEIGHT, node.MASK_WEIGHT, node.DICE_WEIGHT, node.TRAIN_NUM_POINTS)
        criterion = MaskSetCriterion(
            head.NUM_CLASSES,
            matcher,
            class_weight=node.CLASS_WEIGHT,
            mask_weight=node.MASK_WEIGHT,
            dice_weight=node.DICE_WEIGHT,
            no_object_weight=node.NO_OBJECT_WEIGHT,
            num_points=node.TRAIN_NUM_POINTS,
            oversample_ratio=node.OVERSAMPLE_RATIO,
            importance_sample_ratio=node.IMPORTANCE_SAMPLE_RATIO,
        )
        return {
            "backbone": backbone,
            "pixel_decoder": pixel_decoder,
            "transformer_decoder": transformer_decoder,
            "criterion": criterion,
            "num_classes": head.NUM_CLASSES,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "size_divisibility": node.SIZE_DIVISIBILITY,
            "deep_supervision": node.DEEP_SUPERVISION,
            "thing_class_ids": tuple(node.THING_CLASS_IDS),
            "semantic_on": node.TEST.SEMANTIC_ON,
            "instance_on": node.TEST.INSTANCE_ON,
            "panoptic_on": node.TEST.PANOPTIC_ON,
            "object_mask_threshold": node.TEST.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": node.TEST.OVERLAP_THRESHOLD,
            "detections_per_image": node.TEST.DETECTIONS_PER_IMAGE,
            "resize_before_inference": node.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE,
            "mask_padding": cfg.MODEL.MASK_PADDING,
        }

    @property
    def device(self) -> torch.device:
        return self.normalize.mean.device

    def _targets(self, batched_inputs: list[dict[str, Any]], padded_size: tuple[int, int]) -> list[dict[str, Tensor]]:
        targets = []
        for index, record in enumerate(batched_inputs):
            if "instances" not in record:
                raise KeyError(f"training input {index} (image_id={record.get('image_id')!r}) has no 'instances'")
            instances = record["instances"]
            masks = instances.gt_masks
            masks = (masks.tensor if isinstance(masks, BitMasks) else masks).to(self.device, non_blocking=True)
            height, width = masks.shape[-2:]
            padded = masks.new_zeros((masks.shape[0], *padded_size))
            padded[:, :height, :width] = masks
            targets.append({"labels": instances.gt_classes.long().to(self.device, non_blocking=True), "masks": padded})
        return targets

    def predict(self, images: Tensor, mask: Tensor | None) -> dict:
        """Decoder outputs (``pred_logits``, ``pred_masks`` at the mask features' stride, ``aux_outputs``) for
        normalised padded ``images``; ``mask`` (B, H, W), True at padding, is used with ``mask_padding``."""
        if not self.mask_padding:
            mask_features, multi_scale_features = self.pixel_decoder(self.backbone(images))
            return self.transformer_decoder(multi_scale_features, mask_features)
        mask_features, multi_scale_features = self.pixel_decoder(self.backbone(images, mask), mask)
        level_masks = self.pixel_decoder.level_masks(mask)
        decoder_masks = [level_masks[name] for name in self.pixel_decoder.transformer_features]
        return self.transformer_decoder(
            multi_scale_features, mask_features, decoder_masks[: self.pixel_decoder.num_output_levels]
        )

    def upsample_mask_logits(self, mask_logits: Tensor, mask: Tensor | None) -> Tensor:
        """``mask_logits (B, Q, h, w)`` bilinearly resized to the padded input size of ``mask (B, H, W)``; with
        ``mask_padding`` the image edges read border values, not the padding."""
        if self.mask_padding:
            mask_logits = replicate_padding(mask_logits, downsample_mask(mask, self.pixel_decoder.mask_stride))
        return F.interpolate(mask_logits, size=mask.shape[-2:], mode="bilinear", align_corners=False)

    def forward(self, batched_inputs: list[dict[str, Any]]) -> dict[str, Tensor] | list[dict[str, Any]]:
        """Training: weighted losses. Inference: one result dict per input (see module docstring)."""
        images = [self.normalize(record["image"]) for record in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        mask = padding_mask(images.image_sizes, *images.tensor.shape[-2:], device=self.device)
        outputs = self.predict(images.tensor, mask)

        if self.training:
            if not self.deep_supervision:
                outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
            return self.criterion(outputs, self._targets(batched_inputs, tuple(images.tensor.shape[-2:])))

        mask_logits = self.upsample_mask_logits(outputs["pred_masks"].float(), mask)
        results = []
        per_image = zip(outputs["pred_logits"], mask_logits, batched_inputs, images.image_sizes)
        for class_logits, masks, record, image_size in per_image:
            height = record.get("height", image_size[0])
            width = record.get("width", image_size[1])
            class_logits, masks = class_logits.float(), masks.float()
            if self.resize_before_inference:
                masks = sem_seg_postprocess(masks, image_size, height, width)
            result: dict[str, Any] = {}
            if self.semantic_on:
                scores = semantic_inference(class_logits, masks)
                if not self.resize_before_inference:
                    scores = sem_seg_postprocess(scores, image_size, height, width)
                result["sem_seg"] = scores
            if self.panoptic_on:
                result["panoptic_seg"] = panoptic_inference(
                    class_logits, masks, self.thing_class_ids, self.object_mask_threshold, self.overlap_threshold
                )
            if self.instance_on:
                result["instances"] = instance_inference(
                    class_logits, masks, self.detections_per_image, self.thing_class_ids if self.panoptic_on else None
                )
            results.append(result)
        return results

"""DINO (Zhang et al., 2022, "DETR with Improved DeNoising Anchor Boxes") as a detectron2 meta-architecture."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.structures import Boxes, ImageList, Instances
from torch import Tensor, nn
from torchvision.ops import box_convert

from focalnet_pl.dino.criterion import Prediction, SetCriterion
from focalnet_pl.dino.denoising import DenoisingQueries, make_denoising_queries
from focalnet_pl.dino.matcher import HungarianMatcher
from focalnet_pl.dino.transformer import DeformableTransformer, TransformerOutput
from focalnet_pl.layers import (
    MLP,
    DINOSinePositionEmbedding,
    PixelNormalization,
    downsample_mask,
    group_norm,
    masked_group_norm,
    zero_padding,
)
from focalnet_pl.layers.precision import autocast_off, float32

__all__ = ["DINO"]


@META_ARCH_REGISTRY.register()
class DINO(nn.Module):
    """Backbone -> multi-scale projections -> deformable transformer -> class/box heads.

    Training input: detectron2 list of dicts with ``image`` (C, H, W) and ``instances`` (``gt_boxes``
    absolute xyxy, ``gt_classes``); returns a dict of weighted losses. Inference: returns
    ``[{"instances": Instances}]`` with ``pred_boxes`` in the original ``height`` x ``width``,
    ``scores`` and ``pred_classes`` (top ``num_select`` over queries x classes).

    Images are padded to the largest of the batch (``size_divisibility`` 0, the official DINO) and
    the padding is masked out of every attention. With ``mask_padding`` (``MODEL.MASK_PADDING``) it is
    also masked in the backbone and the input projections (zero before the convolutions, GroupNorm
    statistics over the valid positions, level masks of ``ceil(size / stride)`` cells), so that each
    image's detections do not depend on its batch; the official DINO computes on it (False).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        in_features: list[str],
        num_classes: int,
        num_feature_levels: int,
        hidden_dim: int,
        transformer: DeformableTransformer,
        position_embedding: DINOSinePositionEmbedding,
        criterion: SetCriterion,
        pixel_mean: list[float],
        pixel_std: list[float],
        dn_number: int = 100,
        dn_label_noise_ratio: float = 0.5,
        dn_box_noise_scale: float = 0.4,
        aux_loss: bool = True,
        num_select: int = 300,
        size_divisibility: int = 0,
        mask_padding: bool = False,
    ) -> None:
        super().__init__()
        shapes = backbone.output_shape()
        missing = [name for name in in_features if name not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.DINO.IN_FEATURES {in_features}: backbone does not produce {missing} (it has {sorted(shapes)})"
            )
        if num_feature_levels < len(in_features):
            raise ValueError(
                f"MODEL.DINO.NUM_FEATURE_LEVELS ({num_feature_levels}) < len(MODEL.DINO.IN_FEATURES) ({len(in_features)})"
            )
        self.backbone = backbone
        self.in_features = list(in_features)
        self.num_classes = num_classes
        self.transformer = transformer
        self.position_embedding = position_embedding
        self.criterion = criterion
        self.dn_number = dn_number
        self.dn_label_noise_ratio = dn_label_noise_ratio
        self.dn_box_noise_scale = dn_box_noise_scale
        self.aux_loss = aux_loss
        self.num_select = num_select
        self.size_divisibility = size_divisibility
        self.mask_padding = mask_padding
        strides = [shapes[name].stride for name in in_features]
        #: stride of every feature level (the extra levels halve the previous one)
        self.level_strides = strides + [strides[-1] * 2 ** (i + 1) for i in range(num_feature_levels - len(in_features))]

        projections = [
            nn.Sequential(nn.Conv2d(shapes[name].channels, hidden_dim, 1), group_norm(hidden_dim))
            for name in in_features
        ]
        channels = shapes[in_features[-1]].channels
        for _ in range(num_feature_levels - len(in_features)):
            projections.append(
                nn.Sequential(nn.Conv2d(channels, hidden_dim, 3, stride=2, padding=1), group_norm(hidden_dim))
            )
            channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        self.label_embedding = nn.Embedding(num_classes, hidden_dim)
        self.normalize = PixelNormalization(pixel_mean, pixel_std)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict:
        node = cfg.MODEL.DINO
        backbone = build_backbone(cfg)
        hidden = node.HIDDEN_DIM
        class_head = nn.Linear(hidden, node.NUM_CLASSES)
        prior = 0.01
        nn.init.constant_(class_head.bias, -math.log((1 - prior) / prior))
        box_head = MLP(hidden, hidden, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        transformer = DeformableTransformer(
            hidden_dim=hidden,
            num_heads=node.NHEADS,
            num_levels=node.NUM_FEATURE_LEVELS,
            enc_layers=node.ENC_LAYERS,
            dec_layers=node.DEC_LAYERS,
            ffn_dim=node.DIM_FEEDFORWARD,
            dropout=node.DROPOUT,
            enc_points=node.ENC_N_POINTS,
            dec_points=node.DEC_N_POINTS,
            num_queries=node.NUM_QUERIES,
            num_classes=node.NUM_CLASSES,
            two_stage=node.TWO_STAGE,
            class_head=class_head,
            box_head=box_head,
            share_heads=node.SHARE_DECODER_HEADS,
            mask_padding=cfg.MODEL.MASK_PADDING,
        )
        matcher = HungarianMatcher(node.COST_CLASS, node.COST_BBOX, node.COST_GIOU, node.FOCAL_ALPHA, node.FOCAL_GAMMA)
        criterion = SetCriterion(
            node.NUM_CLASSES, matcher, node.CLASS_WEIGHT, node.BBOX_WEIGHT, node.GIOU_WEIGHT,
            node.FOCAL_ALPHA, node.FOCAL_GAMMA,
        )
        return {
            "backbone": backbone,
            "in_features": list(node.IN_FEATURES),
            "num_classes": node.NUM_CLASSES,
            "num_feature_levels": node.NUM_FEATURE_LEVELS,
            "hidden_dim": hidden,
            "transformer": transformer,
            "position_embedding": DINOSinePositionEmbedding(hidden // 2, temperature=node.PE_TEMPERATURE,
                                                            offset=node.PE_OFFSET),
            "criterion": criterion,
            "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": list(cfg.MODEL.PIXEL_STD),
            "dn_number": node.DN_NUMBER,
            "dn_label_noise_ratio": node.DN_LABEL_NOISE_RATIO,
            "dn_box_noise_scale": node.DN_BOX_NOISE_SCALE,
            "aux_loss": node.AUX_LOSS,
            "num_select": node.NUM_SELECT,
            "size_divisibility": node.SIZE_DIVISIBILITY,
            "mask_padding": cfg.MODEL.MASK_PADDING,
        }

    @property
    def device(self) -> torch.device:
        return self.normalize.mean.device

    def preprocess_image(self, batched_inputs: list[dict]) -> tuple[ImageList, Tensor]:
        """Normalise, pad into one batch; returns the ImageList and the (B, H, W) padding mask (True = pad)."""
        dtype = self.input_proj[0][0].weight.dtype
        images = [self.normalize(x["image"], dtype) for x in batched_inputs]
        image_list = ImageList.from_tensors(images, self.size_divisibility)
        batch, _, height, width = image_list.tensor.shape
        mask = torch.ones(batch, height, width, dtype=torch.bool, device=self.device)
        for index, (h, w) in enumerate(image_list.image_sizes):
            mask[index, :h, :w] = False
        return image_list, mask

    def prepare_targets(self, batched_inputs: list[dict], image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """gt boxes -> normalised (cx, cy, w, h) w.r.t. each image's unpadded size.

        Checked and converted where the loader left them (on the host: no device sync), then copied to the
        device without waiting."""
        targets = []
        for index, (inputs, (height, width)) in enumerate(zip(batched_inputs, image_sizes)):
            if "instances" not in inputs:
                raise KeyError(f"DINO training input {index} has no 'instances' (keys: {sorted(inputs)})")
            instances = inputs["instances"]
            labels = instances.gt_classes.long()
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"DINO training input {index}: gt_classes {labels.unique().tolist()} outside "
                    f"[0, MODEL.DINO.NUM_CLASSES={self.num_classes})"
                )
            boxes = instances.gt_boxes.tensor.float()
            boxes = box_convert(boxes / boxes.new_tensor([width, height, width, height]), "xyxy", "cxcywh")
            targets.append({"labels": labels.to(self.device, non_blocking=True),
                            "boxes": boxes.to(self.device, non_blocking=True)})
        return targets

    def multi_scale_features(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Projected features, their padding masks and position embeddings, finest level first."""
        if self.mask_padding:
            features, masks = self._masked_features(images, mask)
        else:
            backbone_features = self.backbone(images)
            features = [proj(backbone_features[name]) for proj, name in zip(self.input_proj, self.in_features)]
            previous = backbone_features[self.in_features[-1]]
            for proj in self.input_proj[len(self.in_features):]:
                previous = proj(previous)
                features.append(previous)
            masks = [F.interpolate(mask[None].float(), size=f.shape[-2:]).bool()[0] for f in features]
        positions = [self.position_embedding(m).to(f.dtype) for f, m in zip(features, masks)]
        return features, masks, positions

    def _masked_features(self, images: Tensor, mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """The projected levels computed as for each image alone, and their masks (``mask_padding``)."""
        masks = [downsample_mask(mask, stride) for stride in self.level_strides]
        backbone_features = self.backbone(images, mask)
        count = len(self.in_features)
        features = [
            masked_group_norm(proj[0](backbone_features[name]), proj[1], level_mask)
            for proj, name, level_mask in zip(self.input_proj, self.in_features, masks)
        ]
        previous, previous_mask = backbone_features[self.in_features[-1]], masks[count - 1]
        for proj, level_mask in zip(self.input_proj[count:], masks[count:]):
            previous = masked_group_norm(proj[0](zero_padding(previous, previous_mask)), proj[1], level_mask)
            previous_mask = level_mask
            features.append(previous)
        return features, masks

    def predict(self, batched_inputs: list[dict]) -> tuple[TransformerOutput, ImageList]:
        """Raw outputs for an inference batch: class logits and boxes of every decoder layer and the
        selected encoder proposals; with the padded images."""
        images, mask = self.preprocess_image(batched_inputs)
        features, masks, positions = self.multi_scale_features(images.tensor, mask)
        return self.transformer(features, masks, positions, None, None, None), images

    def forward(self, batched_inputs: list[dict]) -> dict[str, Tensor] | list[dict[str, Instances]]:
        if not self.training:
            out, images = self.predict(batched_inputs)
            final = {"pred_logits": out.logits[-1], "pred_boxes": out.boxes[-1]}
            return self.inference(final, batched_inputs, images.image_sizes)

        images, mask = self.preprocess_image(batched_inputs)
        features, masks, positions = self.multi_scale_features(images.tensor, mask)
        targets = self.prepare_targets(batched_inputs, images.image_sizes)
        num_queries = self.transformer.num_selected_queries(sum(m[0].numel() for m in masks))
        denoising: DenoisingQueries | None = make_denoising_queries(
            targets, num_queries, self.num_classes, self.label_embedding, self.dn_number, self.dn_label_noise_ratio,
            self.dn_box_noise_scale,
        )
        out = self.transformer(
            features, masks, positions,
            denoising.content if denoising else None,
            denoising.boxes_unsigmoid if denoising else None,
            denoising.attn_mask if denoising else None,
        )
        pad = denoising.meta.pad_size if denoising else 0
        layers: list[Prediction] = [
            {"pred_logits": logits, "pred_boxes": boxes} for logits, boxes in zip(out.logits, out.boxes)
        ]
        matching = [{key: value[:, pad:] for key, value in layer.items()} for layer in layers]

        interm = None
        if out.encoder_logits is not None:
            interm = {"pred_logits": out.encoder_logits, "pred_boxes": out.encoder_boxes}
        dn_outputs = None
        if self.dn_number > 0:
            dn_layers = layers if self.aux_loss else layers[-1:]
            dn_outputs = [{key: value[:, :pad] for key, value in layer.items()} for layer in dn_layers]
        losses = self.criterion(
            matching[-1],
            matching[:-1] if self.aux_loss else [],
            interm,
            dn_outputs,
            denoising.meta if denoising else None,
            targets,
        )
        if dn_outputs is not None and denoising is None:
            # no gt in the whole batch: keep the label embedding in the graph (DDP expects every parameter)
            losses["loss_class_dn"] = losses["loss_class_dn"] + self.label_embedding.weight.sum() * 0.0
        return losses

    def top_detections(self, logits: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The ``num_select`` best (query, class) pairs of ``logits (B, Q, K)``: their scores (sigmoid), class
        indices and normalised xyxy boxes ``(B, num_select, 4)`` from ``boxes (B, Q, 4)`` (normalised cxcywh),
        computed in float32."""
        logits, boxes = float32((logits, boxes))
        with autocast_off(logits.device):
            probabilities = logits.sigmoid().flatten(1)
            num_classes = logits.shape[-1]
            scores, flat_index = probabilities.topk(min(self.num_select, probabilities.shape[1]), dim=1)
            query_index = flat_index // num_classes
            labels = flat_index % num_classes
            boxes = box_convert(boxes, "cxcywh", "xyxy").gather(1, query_index[..., None].expand(-1, -1, 4))
        return scores, labels, boxes

    def inference(self, prediction: Prediction, batched_inputs: list[dict],
                  image_sizes: list[tuple[int, int]]) -> list[dict[str, Instances]]:
        """Top-k (query, class) pairs per image, boxes scaled to the requested output size (``height`` x
        ``width``, default the input size); as the official DINO ``PostProcess``, boxes are neither
        clipped to the image nor filtered. Scores and boxes in float32 (bfloat16 scores would tie)."""
        scores, labels, boxes = self.top_detections(prediction["pred_logits"], prediction["pred_boxes"])
        results = []
        for index, (inputs, (height, width)) in enumerate(zip(batched_inputs, image_sizes)):
            output_size = (int(inputs.get("height", height)), int(inputs.get("width", width)))
            scale = boxes.new_tensor([output_size[1], output_size[0], output_size[1], output_size[0]])
            instances = Instances(output_size)
            instances.pred_boxes = Boxes(boxes[index] * scale)
            instances.scores = scores[index]
            instances.pred_classes = labels[index]
            results.append({"instances": instances})
        return results

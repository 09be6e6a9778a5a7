"""Multi-scale deformable-attention pixel decoder of Mask2Former.

The coarsest feature maps (by default res3-res5) are projected to a common width and refined jointly
by a stack of deformable-attention encoder layers (:class:`focalnet_pl.layers.MultiScaleDeformableAttention`);
the finer maps (res2) join through an FPN-style top-down path that ends in the per-pixel mask embedding.

Given the padding mask of the batch, every step computes as for each image alone (see
:mod:`focalnet_pl.layers.padding`); without it, as the official decoder, on the padding too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from torch import Tensor, nn

from focalnet_pl.layers import (
    DeformableEncoderLayer,
    MaskFormerSinePositionEmbedding,
    downsample_mask,
    encoder_reference_points,
    group_norm,
    level_starts,
    masked_group_norm,
    replicate_padding,
    spatial_shapes_tensor,
    valid_ratios,
    zero_padding,
)
from focalnet_pl.layers.precision import autocast_off

__all__ = ["MSDeformAttnPixelDecoder"]


class MSDeformAttnPixelDecoder(nn.Module):
    """Pixel decoder: returns mask features (B, mask_dim, H/4, W/4) and the multi-scale maps for the decoder."""

    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        conv_dim: int = 256,
        mask_dim: int = 256,
        transformer_in_features: tuple[str, ...] = ("res3", "res4", "res5"),
        num_encoder_layers: int = 6,
        num_heads: int = 8,
        num_points: int = 4,
        ffn_dim: int = 1024,
        dropout: float = 0.0,
        num_output_levels: int = 3,
        common_stride: int = 4,
    ) -> None:
        super().__init__()
        missing = set(transformer_in_features) - set(input_shape)
        if missing:
            raise ValueError(f"transformer features {sorted(missing)} not among backbone outputs {sorted(input_shape)}")
        # coarse to fine
        ordered = sorted(input_shape.items(), key=lambda item: -item[1].stride)
        self.transformer_features = [name for name, _ in ordered if name in transformer_in_features]
        self.fpn_features = [name for name, shape in ordered
                             if name not in transformer_in_features and shape.stride >= common_stride]
        self.num_output_levels = min(num_output_levels, len(self.transformer_features))
        self.strides = {name: shape.stride for name, shape in input_shape.items()}
        #: stride of the mask features (the finest level)
        self.mask_stride = self.strides[(self.fpn_features or self.transformer_features)[-1]]
        self.input_projections = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_shape[name].channels, conv_dim, 1), group_norm(conv_dim))
            for name in self.transformer_features
        )
        for projection in self.input_projections:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.zeros_(projection[0].bias)
        self.position_encoding = MaskFormerSinePositionEmbedding(conv_dim // 2)
        self.level_embed = nn.Parameter(torch.empty(len(self.transformer_features), conv_dim))
        nn.init.normal_(self.level_embed)
        self.encoder_layers = nn.ModuleList(
            DeformableEncoderLayer(conv_dim, ffn_dim, dropout, num_heads, len(self.transformer_features), num_points)
            for _ in range(num_encoder_layers)
        )
        self.lateral_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(input_shape[name].channels, conv_dim, 1, bias=False), group_norm(conv_dim))
            for name in self.fpn_features
        )
        self.output_convs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(conv_dim, conv_dim, 3, padding=1, bias=False), group_norm(conv_dim), nn.ReLU(inplace=True))
            for _ in self.fpn_features
        )
        for module in [*self.lateral_convs, *self.output_convs]:
            nn.init.kaiming_uniform_(module[0].weight, a=1)
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.zeros_(self.mask_features.bias)
        self.mask_dim = mask_dim
        self.conv_dim = conv_dim

    def level_masks(self, padding_mask: Tensor | None) -> dict[str, Tensor | None]:
        """The padding mask of every input level (None without a mask)."""
        return {name: None if padding_mask is None else downsample_mask(padding_mask, stride)
                for name, stride in self.strides.items()}

    def forward(self, features: dict[str, Tensor], padding_mask: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
        """Backbone features -> (mask_features, multi-scale maps ordered coarse to fine), always computed
        in float32 (autocast off, as in the official code: deformable attention is not run in half precision).
        ``padding_mask (B, H, W)``, True at padding: computed as for each image alone (mask features zero at
        padding); None: on the padding too (the official decoder)."""
        with autocast_off(next(iter(features.values())).device):
            return self._forward_float32({name: value.float() for name, value in features.items()},
                                         self.level_masks(padding_mask))

    def _forward_float32(self, features: dict[str, Tensor], masks: dict[str, Tensor | None]) -> tuple[Tensor, list[Tensor]]:
        sources, positions, shapes = [], [], []
        for level, (name, projection) in enumerate(zip(self.transformer_features, self.input_projections)):
            projected = masked_group_norm(projection[0](features[name]), projection[1], masks[name])
            shapes.append(tuple(projected.shape[-2:]))
            sources.append(projected.flatten(2).transpose(1, 2))
            position = self.position_encoding(projected, masks[name])
            positions.append(position.flatten(2).transpose(1, 2) + self.level_embed[level])
        src = torch.cat(sources, 1)
        pos = torch.cat(positions, 1)
        batch, device = src.shape[0], src.device
        spatial_shapes = spatial_shapes_tensor(shapes, device)
        level_start = level_starts(spatial_shapes)
        transformer_masks = [masks[name] for name in self.transformer_features]
        if transformer_masks[0] is None:
            value_mask = None
            ratios = src.new_ones(batch, len(shapes), 2, dtype=torch.float32)
        else:
            value_mask = torch.cat([mask.flatten(1) for mask in transformer_masks], 1)
            ratios = torch.stack([valid_ratios(mask) for mask in transformer_masks], 1)
        reference_points = encoder_reference_points(spatial_shapes, ratios).to(src.dtype)
        for layer in self.encoder_layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start, value_mask)

        outputs = [
            chunk.transpose(1, 2).reshape(batch, -1, height, width)
            for chunk, (height, width) in zip(src.split([h * w for h, w in shapes], 1), shapes)
        ]
        previous_mask = transformer_masks[-1]
        for name, lateral, output_conv in zip(self.fpn_features, self.lateral_convs, self.output_convs):
            mask = masks[name]
            lateral_features = masked_group_norm(lateral[0](features[name]), lateral[1], mask)
            upsampled = F.interpolate(replicate_padding(outputs[-1], previous_mask), size=lateral_features.shape[-2:],
                                      mode="bilinear", align_corners=False)
            convolved = output_conv[0](zero_padding(lateral_features + upsampled, mask))
            outputs.append(output_conv[2](masked_group_norm(convolved, output_conv[1], mask)))
            previous_mask = mask
        return zero_padding(self.mask_features(outputs[-1]), previous_mask), outputs[: self.num_output_levels]

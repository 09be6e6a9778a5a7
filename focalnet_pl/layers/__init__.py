"""Reusable neural-network layers shared by the detection and segmentation heads."""

from focalnet_pl.layers.deformable_encoder import DeformableEncoderLayer, encoder_reference_points, valid_ratios
from focalnet_pl.layers.group_norm import group_norm
from focalnet_pl.layers.mlp import MLP
from focalnet_pl.layers.ms_deform_attn import (
    FusedKernel,
    MultiScaleDeformableAttention,
    get_fused_kernel,
    level_starts,
    ms_deform_attn_sample,
    ms_deform_attn_sample_pytorch,
    register_fused_kernel,
    spatial_shapes_list,
    spatial_shapes_tensor,
    triton_kernel,
)
from focalnet_pl.layers.pixel_normalization import PixelNormalization
from focalnet_pl.layers.padding import (
    downsample_mask,
    masked_group_norm,
    masked_mean,
    padding_mask,
    replicate_padding,
    zero_padding,
)
from focalnet_pl.layers.position_encoding import (
    DINOSinePositionEmbedding,
    MaskFormerSinePositionEmbedding,
    sine_embedding,
)

__all__ = [
    "DINOSinePositionEmbedding",
    "DeformableEncoderLayer",
    "FusedKernel",
    "MLP",
    "MaskFormerSinePositionEmbedding",
    "MultiScaleDeformableAttention",
    "PixelNormalization",
    "downsample_mask",
    "encoder_reference_points",
    "get_fused_kernel",
    "group_norm",
    "level_starts",
    "masked_group_norm",
    "masked_mean",
    "ms_deform_attn_sample",
    "ms_deform_attn_sample_pytorch",
    "padding_mask",
    "register_fused_kernel",
    "replicate_padding",
    "sine_embedding",
    "spatial_shapes_list",
    "spatial_shapes_tensor",
    "triton_kernel",
    "valid_ratios",
    "zero_padding",
]

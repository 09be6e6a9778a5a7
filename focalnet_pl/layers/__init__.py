"""Reusable neural-network layers shared by the detection and segmentation heads."""

from focalnet_pl.layers.ms_deform_attn import (
    FusedKernel,
    MultiScaleDeformableAttention,
    get_fused_kernel,
    ms_deform_attn_sample,
    ms_deform_attn_sample_pytorch,
    register_fused_kernel,
    spatial_shapes_list,
    spatial_shapes_tensor,
    triton_kernel,
)
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
    "FusedKernel",
    "MaskFormerSinePositionEmbedding",
    "MultiScaleDeformableAttention",
    "downsample_mask",
    "get_fused_kernel",
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
    "zero_padding",
]

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
    "get_fused_kernel",
    "ms_deform_attn_sample",
    "ms_deform_attn_sample_pytorch",
    "register_fused_kernel",
    "sine_embedding",
    "spatial_shapes_list",
    "spatial_shapes_tensor",
    "triton_kernel",
]

"""Fused CPU inference for FocalNet's linear layers and depthwise convolutions (oneDNN post-ops).

In eager mode PyTorch runs ``nn.Linear`` on CPU as ``addmm``, which first copies the broadcast bias
into the output and then accumulates the GEMM into it, and runs a following GELU as another pass over
memory. oneDNN can apply the bias and the GELU inside the matmul or convolution kernel instead. The
helpers here call the oneDNN kernels that PyTorch's own CPU compiler emits
(``torch.ops.mkldnn._linear_pointwise`` / ``_convolution_pointwise``). They give the same numbers as
the plain layers (tested) and are used only where that holds and nothing else is lost: float32 CPU
tensors without autograd, autocast, ``torch.compile`` tracing or sharded (DTensor) parameters.
Training always takes the plain PyTorch path.

They are used only in blocks at most :data:`MAX_CHANNELS` wide (the stride-4 stage of FocalNet-T/S/B):
there the GEMMs are narrow and memory-bound, so the saved passes over the large activations dominate;
on wider blocks MKL's GEMM behind ``nn.Linear`` was measured as fast or faster than oneDNN's, and
fusing them made the whole model slower (``docs/benchmarks.md``).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["AVAILABLE", "MAX_CHANNELS", "conv_gelu", "linear", "set_enabled", "use_fused"]

AVAILABLE: bool = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
)
#: widest block (channels of ``x``) that takes the fused kernels
MAX_CHANNELS = 128
_enabled = True


def set_enabled(enabled: bool) -> None:
    """Switch the fused path on or off globally (it is on by default where :data:`AVAILABLE`)."""
    global _enabled
    _enabled = enabled


def use_fused(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when a block's input ``x`` (and its layer with ``weight``) can take the fused inference kernels."""
    return (
        _enabled
        and AVAILABLE
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and type(weight.data) is torch.Tensor
        and x.shape[-1] <= MAX_CHANNELS
    )


def linear(x: torch.Tensor, layer: nn.Linear, activation: Literal["none", "gelu"] = "none") -> torch.Tensor:
    """``activation(layer(x))`` with the bias (and exact-erf GELU) applied inside the GEMM."""
    return torch.ops.mkldnn._linear_pointwise(
        x, layer.weight, layer.bias, activation, [], "none" if activation == "gelu" else ""
    )


def conv_gelu(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``gelu(conv(x))`` for a conv with numeric padding, GELU applied inside the convolution."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, conv.weight, conv.bias, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups,
        "gelu", [], "none",
    )

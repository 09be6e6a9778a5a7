"""Mask2Former as an ONNX graph: images in, per-class semantic scores and the raw query outputs out.

The panoptic and instance outputs select a data-dependent number of segments, which the exporter cannot
trace; the graph gives what they are computed from (``class_logits``, ``mask_logits``) and the semantic
scores, which have fixed shapes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from focalnet_pl.mask2former.mask2former import Mask2Former

if TYPE_CHECKING:
    from focalnet_pl.export import OnnxExportSpec

__all__ = ["Mask2FormerExport", "mask2former_onnx_spec"]


class Mask2FormerExport(nn.Module):
    """``images (B, 3, H, W)`` (any size, shared by the batch; 0-255 in the model's ``INPUT.FORMAT``) ->
    ``sem_seg (B, K, H, W)`` per-class scores (the model's ``sem_seg`` output at the input size),
    ``class_logits (B, Q, K + 1)`` and ``mask_logits (B, Q, H, W)`` (the last decoder layer's, at the input size)."""

    def __init__(self, model: Mask2Former) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        height, width = images.shape[-2:]
        divisor = model.size_divisibility
        normalized = model.normalize(images)
        padded = F.pad(normalized, (0, (-width) % divisor, 0, (-height) % divisor))
        rows = torch.arange(padded.shape[-2], device=images.device) >= height
        cols = torch.arange(padded.shape[-1], device=images.device) >= width
        mask = (rows[:, None] | cols[None, :]).expand(images.shape[0], -1, -1)
        outputs = model.predict(padded, mask)
        mask_logits = model.upsample_mask_logits(outputs["pred_masks"], mask)[..., :height, :width]
        class_logits = outputs["pred_logits"]
        scores = torch.einsum("bqk,bqhw->bkhw", class_logits.softmax(-1)[..., :-1], mask_logits.sigmoid())
        return scores, class_logits, mask_logits


def mask2former_onnx_spec(model: Mask2Former, input_format: str) -> OnnxExportSpec:
    """The :class:`~focalnet_pl.export.OnnxExportSpec` of ``model``: :class:`Mask2FormerExport` traced with
    free batch, height and width."""
    from focalnet_pl.export import OnnxExportSpec

    generator = torch.Generator().manual_seed(0)

    def images(batch: int, height: int, width: int) -> tuple[Tensor]:
        return (torch.rand(batch, 3, height, width, generator=generator) * 255,)

    return OnnxExportSpec(
        module=Mask2FormerExport(model).eval(),
        example_inputs=images(2, 96, 130),
        input_names=["images"],
        output_names=["sem_seg", "class_logits", "mask_logits"],
        dynamic_axes=({0: "batch", 2: "height", 3: "width"},),
        check_inputs=[images(1, 64, 64), images(1, 77, 45)],
        metadata={"input_format": input_format, "sem_seg": "per-class scores (class index = contiguous id)"},
    )

"""DINO as a self-contained ONNX graph: images in, top-scoring boxes, scores and labels out."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from focalnet_pl.dino.dino import DINO

if TYPE_CHECKING:
    from focalnet_pl.export import OnnxExportSpec

__all__ = ["DINOExport", "dino_onnx_spec"]


class DINOExport(nn.Module):
    """``images (B, 3, H, W)`` (any size; the batch's images share it, so none is padded), in the model's input
    format (``INPUT.FORMAT`` channel order, 0-255, as the data loaders give them) ->
    ``boxes (B, K, 4)`` absolute ``x0, y0, x1, y1`` in the input's pixels, ``scores (B, K)`` and ``labels (B, K)``
    (contiguous class indices), the ``K = MODEL.DINO.NUM_SELECT`` best (query, class) pairs of the last
    decoder layer: what :meth:`DINO.forward` gives in inference mode, boxes neither clipped nor filtered."""

    def __init__(self, model: DINO) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        model = self.model
        normalized = model.normalize(images)
        mask = torch.zeros_like(normalized[:, 0], dtype=torch.bool)
        features, masks, positions = model.multi_scale_features(normalized, mask)
        out = model.transformer(features, masks, positions, None, None, None)
        scores, labels, boxes = model.top_detections(out.logits[-1], out.boxes[-1])
        height, width = images.shape[-2:]
        scale = torch.stack([torch.scalar_tensor(width), torch.scalar_tensor(height)] * 2).to(boxes)
        return boxes * scale, scores, labels


def dino_onnx_spec(model: DINO, class_names: list[str] | None, input_format: str) -> OnnxExportSpec:
    """The :class:`~focalnet_pl.export.OnnxExportSpec` of ``model``: :class:`DINOExport` traced with free batch,
    height and width. The example images are large enough for ``NUM_QUERIES`` encoder positions (the query
    selection keeps that many: smaller images are not supported by the exported graph)."""
    from focalnet_pl.export import OnnxExportSpec

    stride = model.level_strides[0]
    side = 32 * math.ceil(stride * math.sqrt(model.transformer.num_queries) / 32) + 32
    generator = torch.Generator().manual_seed(0)

    def images(batch: int, height: int, width: int) -> tuple[Tensor]:
        return (torch.rand(batch, 3, height, width, generator=generator) * 255,)

    metadata = {"input_format": input_format, "boxes": "x0 y0 x1 y1 in input pixels", "labels": "contiguous class index"}
    if class_names is not None:
        metadata["class_names"] = json.dumps(class_names)
    return OnnxExportSpec(
        module=DINOExport(model).eval(),
        example_inputs=images(2, side, side + 32),
        input_names=["images"],
        output_names=["boxes", "scores", "labels"],
        dynamic_axes=({0: "batch", 2: "height", 3: "width"},),
        check_inputs=[images(1, side + 17, side + 45), images(1, side + 40, side - 13)],
        metadata=metadata,
    )

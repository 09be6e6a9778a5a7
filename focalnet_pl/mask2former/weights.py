"""Official Mask2Former checkpoints (facebookresearch/Mask2Former, detectron2 ``MaskFormer``) into our model.

Registered with :func:`focalnet_pl.load_detector_weights` as the ``mask2former`` layout. The checkpoint's
``sem_seg_head.pixel_decoder.*`` (deformable pixel decoder) and ``sem_seg_head.predictor.*``
(masked-attention decoder) are renamed to ours; the class head's rows are the checkpoint's classes plus
"no object" (COCO panoptic's 133 categories are known by id, so a subset can be selected). The
``backbone.*`` tensors load into our FocalNet when they are FocalNet weights; any other backbone (the
official Swin / ResNet releases) cannot, and is reported: as skipped when the model keys under
``backbone.`` are excluded by ``checkpoint_filter`` (the backbone then comes from ``MODEL.FOCALNET.WEIGHTS``),
else as unexpected. The loss constant ``criterion.empty_weight`` is reported as skipped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from torch import Tensor, nn

from focalnet_pl.detector_weights import ClassRows, ConvertedState, register_detector_layout
from focalnet_pl.weights import CheckpointError, StateDict, detect_layout, to_focalnet_layout

__all__ = ["Mask2FormerLayout"]

_PIXEL = "sem_seg_head.pixel_decoder."
_PREDICTOR = "sem_seg_head.predictor."

#: (pattern on the key after ``sem_seg_head.pixel_decoder.``, our key after ``pixel_decoder.``)
_PIXEL_DECODER_RULES: list[tuple[str, str]] = [
    (r"^input_proj\.(\d+)\.([01])\.", r"input_projections.\1.\2."),
    (r"^transformer\.level_embed$", "level_embed"),
    (r"^transformer\.encoder\.layers\.(\d+)\.self_attn\.", r"encoder_layers.\1.self_attn."),
    (r"^transformer\.encoder\.layers\.(\d+)\.(norm[12])\.", r"encoder_layers.\1.\2."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear1\.", r"encoder_layers.\1.ffn.0."),
    (r"^transformer\.encoder\.layers\.(\d+)\.linear2\.", r"encoder_layers.\1.ffn.3."),
    (r"^mask_features\.", "mask_features."),
]

#: (pattern on the key after ``sem_seg_head.predictor.``, our key after ``transformer_decoder.``)
_PREDICTOR_RULES: list[tuple[str, str]] = [
    (r"^transformer_self_attention_layers\.(\d+)\.self_attn\.", r"self_attention.\1.attention."),
    (r"^transformer_self_attention_layers\.(\d+)\.norm\.", r"self_attention.\1.norm."),
    (r"^transformer_cross_attention_layers\.(\d+)\.multihead_attn\.", r"cross_attention.\1.attention."),
    (r"^transformer_cross_attention_layers\.(\d+)\.norm\.", r"cross_attention.\1.norm."),
    (r"^transformer_ffn_layers\.(\d+)\.linear1\.", r"feed_forward.\1.layers.0."),
    (r"^transformer_ffn_layers\.(\d+)\.linear2\.", r"feed_forward.\1.layers.3."),
    (r"^transformer_ffn_layers\.(\d+)\.norm\.", r"feed_forward.\1.norm."),
    (r"^decoder_norm\.", "decoder_norm."),
    (r"^(query_feat|static_query)\.", "query_features."),  # static_query: Mask2Former's pre-v2 name
    (r"^query_embed\.", "query_positions."),
    (r"^level_embed\.", "level_embed."),
    (r"^input_proj\.(\d+)\.", r"input_projections.\1."),
    (r"^class_embed\.", "class_embed."),
    (r"^mask_embed\.layers\.", "mask_embed.layers."),
]

_CLASS_KEYS = ("transformer_decoder.class_embed.weight", "transformer_decoder.class_embed.bias")


def _rename(key: str, rules: list[tuple[str, Any]]) -> str | None:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def _fpn_key(key: str, num_fpn_levels: int) -> str | None:
    """``adapter_k`` / ``layer_k`` (k = 1 is the finest level) -> our coarse-to-fine lateral / output convs."""
    match = re.match(r"^(adapter|layer)_(\d+)\.(norm\.)?(weight|bias)$", key)
    if match is None:
        return None
    kind, level, norm, tensor = match.groups()
    index = num_fpn_levels - int(level)
    if index < 0:
        return None
    modules = "lateral_convs" if kind == "adapter" else "output_convs"
    return f"{modules}.{index}.{1 if norm else 0}.{tensor}"


def _count_layers(keys: list[str], pattern: str) -> int:
    return len({m.group(1) for key in keys if (m := re.match(pattern, key))})


def _check_depths(tensors: StateDict, model: nn.Module) -> None:
    """Raise naming the difference when the checkpoint's decoder depths are not the model's."""
    keys = list(tensors)
    checks = [
        ("masked-attention decoder layers (MODEL.MASK_FORMER.DEC_LAYERS, ours without the +1 of the official key)",
         _count_layers(keys, re.escape(_PREDICTOR) + r"transformer_self_attention_layers\.(\d+)\."),
         model.transformer_decoder.num_layers),
        ("pixel-decoder encoder layers (MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS)",
         _count_layers(keys, re.escape(_PIXEL) + r"transformer\.encoder\.layers\.(\d+)\."),
         len(model.pixel_decoder.encoder_layers)),
    ]
    for what, theirs, ours in checks:
        if theirs != ours:
            raise CheckpointError(f"the Mask2Former checkpoint has {theirs} {what}, the model {ours}")


def _class_rows(num_rows: int) -> ClassRows:
    """COCO panoptic checkpoints (133 classes + no object) know their category ids; others are contiguous."""
    if num_rows == len(COCO_CATEGORIES) + 1:
        return ClassRows(source_ids=tuple(c["id"] for c in COCO_CATEGORIES), extra_rows=1)
    return ClassRows(extra_rows=1)


class Mask2FormerLayout:
    """The detectron2 ``MaskFormer`` state dict of the official Mask2Former (``.pkl`` or ``.pth``)."""

    name = "mask2former"

    @staticmethod
    def tensors(checkpoint: Mapping[str, Any]) -> StateDict:
        inner = checkpoint.get("model", checkpoint)
        return {k: v for k, v in inner.items() if isinstance(v, Tensor)} if isinstance(inner, Mapping) else {}

    def matches(self, checkpoint: Mapping[str, Any]) -> bool:
        return any(key.startswith(_PREDICTOR) for key in self.tensors(checkpoint))

    def convert(self, checkpoint: Mapping[str, Any], model: nn.Module) -> ConvertedState:
        if not all(hasattr(model, part) for part in ("pixel_decoder", "transformer_decoder", "backbone")):
            raise CheckpointError(f"a Mask2Former checkpoint needs a Mask2Former model, got {type(model).__name__}")
        tensors = self.tensors(checkpoint)
        _check_depths(tensors, model)
        num_fpn_levels = len(model.pixel_decoder.fpn_features)
        state = ConvertedState(tensors={})
        backbone = {key.removeprefix("backbone."): value for key, value in tensors.items() if key.startswith("backbone.")}
        self._convert_backbone(backbone, state)
        for key, value in tensors.items():
            if key.startswith("backbone."):
                continue
            if key.startswith(_PIXEL):
                inner = key.removeprefix(_PIXEL)
                ours = _rename(inner, _PIXEL_DECODER_RULES) or _fpn_key(inner, num_fpn_levels)
                ours = ours and f"pixel_decoder.{ours}"
            elif key.startswith(_PREDICTOR):
                ours = _rename(key.removeprefix(_PREDICTOR), _PREDICTOR_RULES)
                ours = ours and f"transformer_decoder.{ours}"
            elif key == "criterion.empty_weight":
                state.skipped.append(f"{key}: loss constant, set by MODEL.MASK_FORMER.NO_OBJECT_WEIGHT")
                continue
            else:
                ours = None
            if ours is None:
                state.unexpected.append(key)
                continue
            state.tensors[ours] = value
            state.converted.add(ours)
        for key in _CLASS_KEYS:
            if key in state.tensors:
                state.class_rows[key] = _class_rows(state.tensors[key].shape[0])
        return state

    @staticmethod
    def _convert_backbone(backbone: StateDict, state: ConvertedState) -> None:
        """FocalNet weights (any layout :func:`to_focalnet_layout` knows) into ``backbone.body``; any other
        backbone kept under its own ``backbone.`` names, which the model does not have (reported by the loader)."""
        if not backbone:
            return
        if not any(".modulation." in key for key in backbone):  # Swin / ResNet: nothing of it fits a FocalNet
            state.tensors.update({f"backbone.{key}": value for key, value in backbone.items()})
            return
        layout, prefix = detect_layout(backbone)
        converted = to_focalnet_layout(backbone)
        state.tensors.update({f"backbone.body.{key}": value for key, value in converted.items()})
        state.converted.update(f"backbone.body.{key}" for key in converted)
        if layout == "official":
            state.unexpected.extend(f"backbone.{key}" for key in backbone if not key.startswith(prefix))
        elif len(converted) < len(backbone):
            state.unexpected.append(f"backbone.* ({len(backbone) - len(converted)} tensors outside the FocalNet)")


register_detector_layout(Mask2FormerLayout())

"""DINO checkpoint layouts for :func:`focalnet_pl.load_detector_weights`.

* ``official-dino``: the official FocalNet-DINO / IDEA-Research DINO ``main.py`` files
  (``{"model": ..., "args": argparse.Namespace, ...}``; ``backbone.0.*``, ``input_proj.*``,
  ``transformer.*``, ``label_enc``, the shared ``class_embed.N`` / ``bbox_embed.N`` copies, the
  FocalNet's 1x1-conv ``modulation.h``). Its class rows are dataset ids (``num_classes`` = largest
  id + 1): 91 rows are COCO's, selected by the dataset's category ids and names; with another row
  count the dataset is unknown, and the class tensors load only into a model with as many classes.
* ``detrex-dino``: detrex DINO checkpoints (``{"model": ...}`` from detectron2's ``Checkpointer``;
  ``neck.convs.*``, ``transformer.encoder.layers.N.attentions.0``, one class / box head per decoder
  layer plus one for the encoder proposals, contiguous class rows: 80 are COCO's in id order). They need
  ``MODEL.DINO.SHARE_DECODER_HEADS: false``, ``PE_TEMPERATURE: 10000`` and ``PE_OFFSET: -0.5``.

Both convert to our names and check the architecture first: a checkpoint with other feature levels,
hidden size, backbone width / depths / focal levels, layer or query counts is refused with every
difference named, with the config key to change.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from focalnet_pl.detector_weights import ClassRows, ConvertedState, register_detector_layout
from focalnet_pl.weights import CheckpointError

__all__ = ["DetrexDINOLayout", "OfficialDINOLayout", "dino_architecture"]

Rule = tuple[str, str | Callable[[re.Match], str]]

#: our names of the transformer tensors that both layouts rename the same way
_COMMON_RULES: list[Rule] = [
    (r"^transformer\.tgt_embed\.", "transformer.content_queries."),
    (r"^transformer\.refpoint_embed\.", "transformer.anchor_boxes."),
    (r"^transformer\.enc_output\.", "transformer.proposal_proj."),
    (r"^transformer\.enc_output_norm\.", "transformer.proposal_norm."),
    (r"^transformer\.decoder\.ref_point_head\.", "transformer.query_pos_head."),
    (r"^transformer\.decoder\.norm\.", "transformer.decoder_norm."),
    (r"^label_enc\.", "label_embedding."),
]

_OFFICIAL_RULES: list[Rule] = _COMMON_RULES + [
    (r"^backbone\.0\.", "backbone.body."),
    (r"^transformer\.level_embed$", "transformer.level_embed"),
    (r"^input_proj\.", "input_proj."),
    (r"^transformer\.enc_out_class_embed\.", "transformer.proposal_class_head."),
    (r"^transformer\.enc_out_bbox_embed\.", "transformer.proposal_box_head."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.(self_attn|cross_attn)\.", r"transformer.\1coder_layers.\2.\3."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.linear1\.", r"transformer.\1coder_layers.\2.ffn.0."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.linear2\.", r"transformer.\1coder_layers.\2.ffn.3."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norm([12])\.", r"transformer.encoder_layers.\1.norm\2."),
    # official decoder layers are cross-attention (norm1), self-attention (norm2), FFN (norm3); ours
    # name the norms in the order they run: self-attention (norm1), cross-attention (norm2), FFN (norm3)
    (r"^transformer\.decoder\.layers\.(\d+)\.norm1\.", r"transformer.decoder_layers.\1.norm2."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm2\.", r"transformer.decoder_layers.\1.norm1."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norm3\.", r"transformer.decoder_layers.\1.norm3."),
]

_DETREX_RULES: list[Rule] = _COMMON_RULES + [
    (r"^backbone\.", "backbone.body."),
    (r"^transformer\.level_embeds$", "transformer.level_embed"),
    (r"^neck\.convs\.(\d+)\.conv\.", r"input_proj.\1.0."),
    (r"^neck\.convs\.(\d+)\.norm\.", r"input_proj.\1.1."),
    (r"^transformer\.encoder\.layers\.(\d+)\.attentions\.0\.", r"transformer.encoder_layers.\1.self_attn."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.ffns\.0\.layers\.0\.0\.", r"transformer.\1coder_layers.\2.ffn.0."),
    (r"^transformer\.(en|de)coder\.layers\.(\d+)\.ffns\.0\.layers\.1\.", r"transformer.\1coder_layers.\2.ffn.3."),
    (r"^transformer\.encoder\.layers\.(\d+)\.norms\.([01])\.",
     lambda m: f"transformer.encoder_layers.{m.group(1)}.norm{int(m.group(2)) + 1}."),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.0\.attn\.", r"transformer.decoder_layers.\1.self_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.attentions\.1\.", r"transformer.decoder_layers.\1.cross_attn."),
    (r"^transformer\.decoder\.layers\.(\d+)\.norms\.([012])\.",
     lambda m: f"transformer.decoder_layers.{m.group(1)}.norm{int(m.group(2)) + 1}."),
]


def _rename(key: str, rules: list[Rule]) -> str | None:
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    return None


def _count(keys: Collection[str], pattern: str) -> int:
    return len({match.group(1) for key in keys if (match := re.match(pattern, key))})


def dino_architecture(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """What the tensors of a DINO state dict in our names say about its architecture, keyed by a
    description naming the config key that sets it (entries the state dict has no tensors for are left out)."""
    facts: dict[str, Any] = {}
    if "transformer.level_embed" in state:
        levels, hidden = state["transformer.level_embed"].shape
        facts["feature levels (MODEL.DINO.NUM_FEATURE_LEVELS)"] = levels
        facts["hidden size (MODEL.DINO.HIDDEN_DIM)"] = hidden
    projections = [key for key in state if re.match(r"input_proj\.\d+\.0\.weight$", key)]
    if projections:
        facts["backbone feature maps (MODEL.DINO.IN_FEATURES)"] = sum(state[k].shape[-1] == 1 for k in projections)
    if "transformer.content_queries.weight" in state:
        facts["queries (MODEL.DINO.NUM_QUERIES)"] = state["transformer.content_queries.weight"].shape[0]
    for part in ("encoder", "decoder"):
        layers = _count(state, rf"transformer\.{part}_layers\.(\d+)\.")
        if layers:
            facts[f"{part} layers (MODEL.DINO.{part[:3].upper()}_LAYERS)"] = layers
    if "backbone.body.patch_embed.proj.weight" in state:
        facts["backbone width (MODEL.FOCALNET.VARIANT / EMBED_DIM)"] = state["backbone.body.patch_embed.proj.weight"].shape[0]
        facts["backbone depths (MODEL.FOCALNET.VARIANT / DEPTHS)"] = tuple(
            _count(state, rf"backbone\.body\.layers\.{stage}\.blocks\.(\d+)\.") for stage in range(4)
        )
        facts["focal levels (MODEL.FOCALNET.VARIANT / FOCAL_LEVELS)"] = _count(
            state, r"backbone\.body\.layers\.0\.blocks\.0\.modulation\.focal_layers\.(\d+)\."
        )
    return facts


def check_architecture(layout: str, state: Mapping[str, Tensor], model: nn.Module) -> None:
    """Raise :class:`CheckpointError` naming every architectural difference between ``state`` (our names)
    and ``model``."""
    ours = dino_architecture(model.state_dict())
    theirs = dino_architecture(state)
    differences = [f"{name}: checkpoint {theirs[name]}, model {ours[name]}"
                   for name in ours if name in theirs and theirs[name] != ours[name]]
    if differences:
        raise CheckpointError(f"{layout} DINO checkpoint does not fit the model's architecture: " + "; ".join(differences))


def _same(a: Tensor, b: Tensor) -> bool:
    """Equal values (any float dtype, including the 8-bit ones ``torch.equal`` does not take)."""
    return a.shape == b.shape and (a.data_ptr() == b.data_ptr() or torch.equal(a.double(), b.double()))


def _unwrap(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    inner = checkpoint.get("model")
    return inner if isinstance(inner, Mapping) else checkpoint


def coco_class_rows(num_rows: int, contiguous: bool) -> ClassRows | None:
    """Class rows of a COCO checkpoint: row = category id (``0..90``, the official DINO's 91 rows; the
    official label embedding has one more) or COCO's 80 classes in id order (detectron2 / detrex);
    ``None`` for another row count (its classes are not known)."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    names = {c["id"]: c["name"] for c in COCO_CATEGORIES if c["isthing"]}
    if contiguous:
        ids = tuple(sorted(names)) if num_rows == len(names) else None
    else:
        ids = tuple(range(num_rows)) if num_rows in (max(names) + 1, max(names) + 2) else None
    return None if ids is None else ClassRows(source_ids=ids, source_names=tuple(names.get(i) for i in ids))


#: our class-dependent tensors (class rows along dim 0)
_CLASS_KEYS = re.compile(r"^transformer\.(class_head|class_heads\.\d+|proposal_class_head)\.|^label_embedding\.")
#: the per-layer prediction heads of both layouts (``transformer.decoder.*`` holds the same modules again)
_HEAD_KEYS = re.compile(r"^(?:transformer\.decoder\.)?(class|bbox)_embed\.(\d+)\.(.+)$")


class _DINOLayout(ABC):
    """Renaming rules, plus the per-layer prediction heads that both layouts store (``class_embed.N``,
    ``bbox_embed.N`` and their ``transformer.decoder.`` copies)."""

    name: str
    #: the key that tells the layout apart (both have the official query-position MLP)
    level_embed_key: str
    #: whether the class rows are COCO's 80 in id order (else row = dataset id)
    contiguous_classes: bool

    @abstractmethod
    def rules(self, keys: Collection[str]) -> list[Rule]:
        """Renaming rules of this layout for a checkpoint with these ``keys``."""

    def proposal_head_index(self, dec_layers: int) -> int | None:
        """Index of the encoder-proposal head among the ``class_embed.N`` (None: stored separately)."""
        return None

    def matches(self, checkpoint: Mapping[str, Any]) -> bool:
        tensors = _unwrap(checkpoint)
        return "transformer.decoder.ref_point_head.layers.0.weight" in tensors and self.level_embed_key in tensors

    def key_map(self, keys: Collection[str], dec_layers: int, share_heads: bool) -> dict[str, str | None]:
        """Our name for every checkpoint key (``None``: nothing of ours) in a model with ``dec_layers``
        decoder layers and shared (or per-layer) heads; several checkpoint keys may map to one of ours."""
        rules = self.rules(keys)
        proposal = self.proposal_head_index(dec_layers)
        mapping: dict[str, str | None] = {}
        for key in keys:
            head = _HEAD_KEYS.match(key)
            if head is None:
                mapping[key] = _rename(key, rules)
                continue
            ours = "class_head" if head.group(1) == "class" else "box_head"
            index, suffix = int(head.group(2)), head.group(3)
            if index == proposal:
                mapping[key] = f"transformer.proposal_{ours}.{suffix}"
            elif index >= dec_layers:
                mapping[key] = None
            else:
                mapping[key] = f"transformer.{ours}.{suffix}" if share_heads else f"transformer.{ours}s.{index}.{suffix}"
        return mapping

    def convert(self, checkpoint: Mapping[str, Any], model: nn.Module) -> ConvertedState:
        transformer = getattr(model, "transformer", None)
        if not hasattr(transformer, "layer_heads"):
            raise CheckpointError(f"{self.name} checkpoint: the model is a {type(model).__name__}, not a DINO "
                                  "(MODEL.META_ARCHITECTURE: DINO)")
        source = {k: v for k, v in _unwrap(checkpoint).items() if isinstance(v, Tensor)}
        dec_layers = len(transformer.decoder_layers)
        self._check_head_count(source, dec_layers)
        target = model.state_dict()
        state = ConvertedState(tensors={})
        for key, ours in self.key_map(source, dec_layers, transformer.share_heads).items():
            value = source[key]
            if ours is None:
                state.unexpected.append(key)
                continue
            if ours.endswith(".modulation.h.weight") and ours in target and value.numel() == target[ours].numel():
                value = value.reshape(target[ours].shape)  # the official 1x1 conv is our linear layer
            first = state.tensors.get(ours)
            if first is not None and not _same(first, value):
                if _HEAD_KEYS.match(key) and transformer.share_heads:
                    raise CheckpointError(
                        f"{self.name} DINO checkpoint has a head per decoder layer ({key} differs from layer 0's): "
                        "build the model with MODEL.DINO.SHARE_DECODER_HEADS: false"
                    )
                raise CheckpointError(f"{self.name} DINO checkpoint: {key} should be a copy of the tensor already "
                                      f"loaded as {ours}, but differs from it")
            state.tensors[ours] = value
            state.converted.add(ours)
        check_architecture(self.name, state.tensors, model)
        for key, value in state.tensors.items():
            if _CLASS_KEYS.match(key):
                state.class_rows[key] = coco_class_rows(value.shape[0], self.contiguous_classes) or ClassRows()
        return state

    def _check_head_count(self, source: Collection[str], dec_layers: int) -> None:
        proposal = self.proposal_head_index(dec_layers)
        for kind in ("class", "bbox"):
            layers = sorted({int(m.group(2)) for key in source if (m := _HEAD_KEYS.match(key)) and m.group(1) == kind}
                            - {proposal})
            if layers and layers != list(range(dec_layers)):
                raise CheckpointError(
                    f"{self.name} DINO checkpoint has {kind}_embed heads for decoder layers {layers}, the model has "
                    f"{dec_layers} (MODEL.DINO.DEC_LAYERS)"
                )


class OfficialDINOLayout(_DINOLayout):
    """The official FocalNet-DINO / IDEA-Research DINO ``main.py`` checkpoints."""

    name = "official-dino"
    level_embed_key = "transformer.level_embed"
    contiguous_classes = False

    def rules(self, keys: Collection[str]) -> list[Rule]:
        return _OFFICIAL_RULES


class DetrexDINOLayout(_DINOLayout):
    """detrex ``projects/dino`` checkpoints."""

    name = "detrex-dino"
    level_embed_key = "transformer.level_embeds"
    contiguous_classes = True

    def rules(self, keys: Collection[str]) -> list[Rule]:
        # the extra stride-2 levels follow the backbone levels: neck.extra_convs.J -> input_proj.{levels + J}
        levels = _count(keys, r"^neck\.convs\.(\d+)\.")
        extra: Rule = (r"^neck\.extra_convs\.(\d+)\.(conv|norm)\.",
                       lambda m: f"input_proj.{levels + int(m.group(1))}.{int(m.group(2) == 'norm')}.")
        return [extra] + _DETREX_RULES

    def proposal_head_index(self, dec_layers: int) -> int | None:
        return dec_layers  # detrex scores the encoder proposals with its last class / box head


register_detector_layout(OfficialDINOLayout())
register_detector_layout(DetrexDINOLayout())

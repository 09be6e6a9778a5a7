"""Contrastive denoising (CDN) queries of DINO.

Ground-truth boxes are copied into ``groups`` denoising groups. Each group holds ``2 * max_gt``
queries: the first half are *positive* copies (box noise below ``box_noise_scale`` half-extents,
trained to reconstruct the gt), the second half *negative* copies (noise between 1 and 2 times
that, trained as "no object"). Labels are flipped to a random class with probability
``label_noise_ratio / 2``. The self-attention mask keeps the groups from seeing each other and the
matching queries from seeing any denoising query (they would otherwise read the answers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.ops import box_convert

from focalnet_pl.dino.box_ops import inverse_sigmoid


@dataclass
class DenoisingMeta:
    """Layout of the denoising part of the decoder queries."""

    groups: int  # number of denoising groups
    max_gt: int  # gts per half group (the largest gt count in the batch)
    num_gts: list[int]  # gts of each image

    @property
    def group_size(self) -> int:
        return 2 * self.max_gt

    @property
    def pad_size(self) -> int:
        return self.groups * self.group_size

    def positive_indices(self, image: int) -> tuple[Tensor, Tensor]:
        """``(query_indices, target_indices)`` of the positive queries of one image, over all groups."""
        count = self.num_gts[image]
        targets = torch.arange(count, dtype=torch.int64)
        starts = torch.arange(self.groups, dtype=torch.int64) * self.group_size
        queries = (starts[:, None] + targets[None, :]).flatten()
        return queries, targets.repeat(self.groups)


@dataclass
class DenoisingQueries:
    content: Tensor  # (B, pad_size, hidden_dim) label embeddings
    boxes_unsigmoid: Tensor  # (B, pad_size, 4) logit-space noisy boxes (cx, cy, w, h)
    attn_mask: Tensor  # (pad_size + num_queries,)*2 bool, True = may not attend
    meta: DenoisingMeta


def build_attention_mask(meta: DenoisingMeta, num_queries: int, device: torch.device | None = None) -> Tensor:
    """Boolean self-attention mask over ``[denoising queries, matching queries]``; True blocks attention."""
    pad = meta.pad_size
    total = pad + num_queries
    mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True  # matching queries never see the denoising queries
    for group in range(meta.groups):
        start, end = group * meta.group_size, (group + 1) * meta.group_size
        mask[start:end, :start] = True
        mask[start:end, end:pad] = True
    return mask


def make_denoising_queries(
    targets: list[dict[str, Tensor]],
    num_queries: int,
    num_classes: int,
    label_embedding: nn.Embedding,
    dn_number: int,
    label_noise_ratio: float,
    box_noise_scale: float,
) -> DenoisingQueries | None:
    """Noisy positive/negative gt copies for one training batch, or None when there is nothing to denoise.

    ``targets[b]`` holds ``labels (G_b,)`` and normalised ``boxes (G_b, 4)`` as ``(cx, cy, w, h)``.
    """
    num_gts = [int(t["labels"].numel()) for t in targets]
    max_gt = max(num_gts, default=0)
    if dn_number <= 0 or max_gt == 0:
        return None
    meta = DenoisingMeta(groups=max(dn_number // max_gt, 1), max_gt=max_gt, num_gts=num_gts)
    device = label_embedding.weight.device
    batch = len(targets)

    labels = torch.full((batch, meta.pad_size), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(batch, meta.pad_size, 4, device=device)
    occupied = torch.zeros(batch, meta.pad_size, dtype=torch.bool, device=device)
    negative = torch.zeros(batch, meta.pad_size, dtype=torch.bool, device=device)
    offsets = torch.arange(meta.groups, device=device) * meta.group_size
    for image, target in enumerate(targets):
        count = num_gts[image]
        if count == 0:
            continue
        within = torch.arange(count, device=device)
        positive_slots = (offsets[:, None] + within[None]).flatten()
        negative_slots = positive_slots + max_gt
        for slots, is_negative in ((positive_slots, False), (negative_slots, True)):
            labels[image, slots] = target["labels"].to(device).repeat(meta.groups)
            boxes[image, slots] = target["boxes"].to(device, boxes.dtype).repeat(meta.groups, 1)
            occupied[image, slots] = True
            negative[image, slots] = is_negative

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & occupied
        random_labels = torch.randint(0, num_classes, labels.shape, device=device)
        labels = torch.where(flip, random_labels, labels)

    if box_noise_scale > 0:
        corners = box_convert(boxes, "cxcywh", "xyxy")
        half_extent = (boxes[..., 2:] / 2).repeat(1, 1, 2)
        magnitude = torch.rand_like(corners) + negative[..., None].to(corners.dtype)  # [0,1) pos, [1,2) neg
        sign = torch.randint(0, 2, corners.shape, device=device).to(corners.dtype) * 2 - 1
        corners = (corners + sign * magnitude * half_extent * box_noise_scale).clamp(0.0, 1.0)
        noisy = box_convert(corners, "xyxy", "cxcywh")
        boxes = torch.where(occupied[..., None], noisy, boxes)

    # unoccupied slots: zero content and a zero logit box (centre, half size); they are trained as background
    embedded = label_embedding(labels.clamp(max=num_classes - 1)) * occupied[..., None]
    boxes_unsigmoid = torch.where(occupied[..., None], inverse_sigmoid(boxes), torch.zeros_like(boxes))
    return DenoisingQueries(
        content=embedded,
        boxes_unsigmoid=boxes_unsigmoid,
        attn_mask=build_attention_mask(meta, num_queries, device),
        meta=meta,
    )

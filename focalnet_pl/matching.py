"""Host side of Hungarian matching, shared by the DINO and Mask2Former criteria, with as few device syncs as
the algorithm allows.

The assignment itself (scipy's ``linear_sum_assignment``) runs on the host. :func:`assign` copies the cost
matrices of every prediction set and image to the host together (one device sync for the whole step),
and :func:`indices_to_device` sends all the matched indices back in one asynchronous copy.
:func:`average_num_targets` is the loss normaliser of both criteria.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist
from scipy.optimize import linear_sum_assignment
from torch import Tensor

__all__ = ["assign", "assign_sets", "average_num_targets", "indices_to_device", "to_device_async"]


def to_device_async(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (on the host) on ``device`` without making the host wait: pinned and copied
    asynchronously for CUDA (the pinned buffer is kept until the copy is done)."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def average_num_targets(count: int, device: torch.device) -> float | Tensor:
    """Ground-truth instances per process (the losses' normaliser), at least 1: a host number, or with
    several processes a device scalar averaged over them (without waiting for the result)."""
    if dist.is_available() and dist.is_initialized():
        total = torch.tensor(float(count)).to(device, non_blocking=True)
        dist.all_reduce(total)
        return (total / dist.get_world_size()).clamp(min=1.0)
    return max(float(count), 1.0)


def assign(costs: Sequence[Tensor], names: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
    """Minimum-cost one-to-one assignment of each ``(Q, G)`` matrix of ``costs`` (on any device, copied to
    the host in one go). Returns ``(rows, cols)`` int64 host tensors per matrix, sorted by row; a matrix
    with NaN/inf raises :class:`FloatingPointError` naming it by ``names``."""
    if not costs:
        return []
    host = torch.cat([cost.flatten() for cost in costs]).cpu().numpy()  # the one device-to-host copy
    results, offset = [], 0
    for cost, name in zip(costs, names):
        rows, cols = cost.shape
        block = host[offset:offset + rows * cols].reshape(rows, cols)
        offset += rows * cols
        if not np.isfinite(block).all():
            raise FloatingPointError(
                f"non-finite matching cost for {name} (predictions contain NaN/inf: training diverged)"
            )
        matched_rows, matched_cols = linear_sum_assignment(block)
        results.append((torch.as_tensor(matched_rows, dtype=torch.int64), torch.as_tensor(matched_cols, dtype=torch.int64)))
    return results


def assign_sets(costs: Sequence[Tensor], slots: Sequence[tuple[int, int]], num_sets: int,
                num_images: int) -> list[list[tuple[Tensor, Tensor]]]:
    """:func:`assign` of the cost matrix of each ``(prediction set, image)`` slot, all in one host copy;
    returns ``indices[set][image] = (query_indices, target_indices)``, empty for slots without a matrix
    (images without targets)."""
    names = [f"image {image} of the batch, prediction set {set_index}" for set_index, image in slots]
    empty = torch.empty(0, dtype=torch.int64)
    indices = [[(empty, empty)] * num_images for _ in range(num_sets)]
    for (set_index, image), pairs in zip(slots, assign(costs, names)):
        indices[set_index][image] = pairs
    return indices


def indices_to_device(
    indices: Sequence[Sequence[tuple[Tensor, Tensor]]], target_counts: Sequence[int], device: torch.device
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """``indices[set][image] = (query_indices, target_indices)`` (host tensors) -> per set the device tensors
    ``(images, queries, targets)`` of its matched pairs in image order, ``targets`` indexing the
    concatenation of all images' targets (``target_counts`` per image). One asynchronous copy for all sets."""
    first_target = torch.tensor([0, *target_counts[:-1]], dtype=torch.int64).cumsum(0)
    rows, sizes = [], []
    for per_image in indices:
        images = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(per_image)])
        queries = torch.cat([queries for queries, _ in per_image])
        targets = torch.cat([first_target[image] + gts for image, (_, gts) in enumerate(per_image)])
        rows.append(torch.stack([images, queries, targets]))
        sizes.append(len(queries))
    on_device = to_device_async(torch.cat(rows, 1), device)
    return [tuple(part.unbind(0)) for part in on_device.split(sizes, 1)]

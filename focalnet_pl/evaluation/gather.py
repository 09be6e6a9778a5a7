"""Gathering per-image evaluation records across distributed ranks."""

from __future__ import annotations

from typing import Hashable, TypeVar

import torch.distributed as dist

__all__ = ["gather_unique_by_key"]

RecordT = TypeVar("RecordT")


def gather_unique_by_key(records: dict[Hashable, RecordT]) -> dict[Hashable, RecordT]:
    """Merge ``records`` from every rank (all ranks receive the union); a key seen twice is kept once.

    Distributed samplers repeat a few samples so every rank gets the same number; keying records by
    image id makes the merged result independent of that padding.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dict(records)
    gathered: list[dict[Hashable, RecordT] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    merged: dict[Hashable, RecordT] = {}
    for rank_records in gathered:
        for key, value in (rank_records or {}).items():
            merged.setdefault(key, value)
    return merged

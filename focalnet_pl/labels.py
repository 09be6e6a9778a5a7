"""ImageNet label maps (1K, 22K) from data a user already has: timm's bundled ImageNet info, or a file.

The released ImageNet-22K FocalNets (L/XL/H) classify into 21842 classes in Microsoft's order, the
1000 ImageNet-1K classes first (timm's ``imagenet22k_ms_synsets``); ``fall11`` 22K heads have 21841.
Nothing is read from the network.
"""
from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

__all__ = ["IMAGENET_SUBSETS", "class_names_from_file", "imagenet_class_names", "imagenet_head_rows"]

log = logging.getLogger(__name__)

#: classifier outputs -> timm ImageNet subset with that class order
IMAGENET_SUBSETS = {1000: "imagenet-1k", 21841: "imagenet-22k", 21842: "imagenet-22k-ms", 21843: "imagenet-21k-goog"}


@lru_cache(maxsize=8)
def _imagenet_info(num_classes: int):
    subset = IMAGENET_SUBSETS.get(num_classes)
    if subset is None:
        return None
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        log.warning("timm is not installed: no ImageNet label map for a %d-class head (pip install timm, or give "
                    "class names as a file)", num_classes)
        return None
    return ImageNetInfo(subset)


def imagenet_class_names(num_classes: int) -> list[str] | None:
    """Names (WordNet lemmas, e.g. ``"tench, Tinca tinca"``) of an ImageNet head with ``num_classes``
    outputs, or ``None`` when the class count is not an ImageNet one or timm is missing."""
    info = _imagenet_info(num_classes)
    return [info.index_to_description(i) for i in range(num_classes)] if info is not None else None


def imagenet_head_rows(source_classes: int, target_classes: int) -> list[int] | None:
    """Rows of a ``source_classes`` ImageNet head that give each of ``target_classes`` classes, matched
    by WordNet synset (e.g. 21842 -> 1000: the ImageNet-1K classes of a 22K head), or ``None`` when
    the target classes are not all among the source's."""
    if source_classes == target_classes:
        return None
    source, target = _imagenet_info(source_classes), _imagenet_info(target_classes)
    if source is None or target is None:
        return None
    position = {synset: i for i, synset in enumerate(source.label_names())}
    wanted = target.label_names()
    return [position[s] for s in wanted] if all(s in position for s in wanted) else None


def class_names_from_file(path: str | Path) -> list[str]:
    """One class name per line (blank lines ignored)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"class names file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]

"""What each task reads of its datamodule, declared once: a ``Protocol`` per kind of task.

A task reads its datamodule only through these members; :func:`data_interface` refuses a datamodule
that lacks one, naming what is missing, instead of falling back to a guessed value.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import lightning as L

if TYPE_CHECKING:
    from detectron2.data import Metadata

__all__ = ["ClassificationData", "DetectronData", "data_interface"]


class ClassificationData(Protocol):
    """The datamodule of :class:`~focalnet_pl.tasks.ClassificationTask` (e.g. ``ImageNetDataModule``)."""

    #: training images per device (the learning rate scales with the total batch)
    batch_size: int
    #: size of the evaluated images (recorded in checkpoints)
    image_size: int
    #: per-channel normalisation of the images (to draw them back)
    mean: Sequence[float]
    std: Sequence[float]

    @property
    def num_classes(self) -> int: ...

    @property
    def class_names(self) -> list[str]: ...


class DetectronData(Protocol):
    """The datamodule of :class:`~focalnet_pl.tasks.DetectionTask` and its segmentation variant
    (``COCODataModule``, the ADE20K / COCO panoptic datamodules): detectron2 dataset dicts."""

    #: training images per device
    batch_size: int
    #: channel order of the images ("RGB" / "BGR"); must equal the model's ``INPUT.FORMAT``
    image_format: str

    @property
    def eval_size(self) -> tuple[int, int]:
        """(shorter side, longest side) of the evaluated images (recorded in checkpoints)."""

    @property
    def class_metadata(self) -> Metadata | None:
        """detectron2 ``Metadata`` of the classes the model predicts (``thing_classes``,
        ``thing_dataset_id_to_contiguous_id``; segmentation data also ``stuff_*``, ``thing_class_ids``);
        ``None`` for data without annotations (a folder of images to predict on)."""

    def dataset_metadata(self, split: str) -> Metadata:
        """Metadata of ``split`` for its evaluation: ``evaluator_type`` ("coco", "panoptic" or "semantic")
        besides the class fields."""

    def instance_ground_truth(self, split: str) -> str | Mapping[str, Any]:
        """COCO instances ground truth of ``split`` (a json file or its content) for mask / box AP."""


DataT = TypeVar("DataT")


def data_interface(trainer: L.Trainer | None, interface: type[DataT], task: str) -> DataT | None:
    """The trainer's datamodule as ``interface``; ``None`` without a trainer or datamodule.

    Raises ``TypeError`` naming the members the datamodule lacks.
    """
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return None
    members = [name for name in vars(interface) if not name.startswith("_")] + list(interface.__annotations__)
    missing = sorted({name for name in members if not _has_member(datamodule, name)})
    if missing:
        raise TypeError(
            f"{task} reads {', '.join(sorted(set(members)))} of its datamodule ({interface.__module__}."
            f"{interface.__name__}); {type(datamodule).__name__} has no {', '.join(missing)}"
        )
    return datamodule  # type: ignore[return-value]


def _has_member(datamodule: Any, name: str) -> bool:
    """Whether ``name`` is defined on the datamodule or its class (without evaluating properties)."""
    return name in vars(datamodule) or any(name in vars(cls) for cls in type(datamodule).__mro__)

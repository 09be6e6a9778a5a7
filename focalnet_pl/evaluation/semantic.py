"""Semantic segmentation metrics from a dataset-level confusion matrix (mIoU, pixel accuracy).

Each image contributes a sparse confusion matrix keyed by its image id, so that the duplicates a
``DistributedSampler`` adds to even out the shards are counted once when the ranks are gathered.
The metrics are detectron2's ``SemSegEvaluator``'s: pixels whose label is ``ignore_index`` are left
out, and the mean IoU and mean accuracy average over the classes present in the ground truth of the
whole dataset (a class that is only ever predicted counts in no mean; its false positives still
lower the IoU of the classes whose pixels it takes).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from focalnet_pl.evaluation.gather import gather_unique_by_key

__all__ = ["SemanticSegmentationEvaluator", "confusion_matrix_metrics"]


def confusion_matrix_metrics(confusion: np.ndarray, class_names: list[str] | None = None) -> dict[str, float]:
    """mIoU, frequency-weighted IoU, pixel accuracy and mean class accuracy (in %) from a (K, K) matrix,
    as detectron2's ``SemSegEvaluator`` computes them.

    ``confusion[g, p]`` counts pixels labelled ``g`` and predicted ``p``. Means run over the classes
    present in the labels. Per-class IoU entries (``IoU-<name>``) are added for those classes when
    ``class_names`` is given.
    """
    confusion = confusion.astype(np.float64)
    true_positive = np.diag(confusion)
    label_count = confusion.sum(1)
    predicted_count = confusion.sum(0)
    union = label_count + predicted_count - true_positive
    present = label_count > 0
    iou = np.divide(true_positive, union, out=np.zeros_like(true_positive), where=present)
    accuracy = np.divide(true_positive, label_count, out=np.zeros_like(true_positive), where=present)
    total = label_count.sum()
    metrics = {
        "mIoU": 100.0 * float(iou[present].mean()) if present.any() else 0.0,
        "fwIoU": 100.0 * float((iou * label_count).sum() / total) if total > 0 else 0.0,
        "pACC": 100.0 * float(true_positive.sum() / total) if total > 0 else 0.0,
        "mACC": 100.0 * float(accuracy[present].mean()) if present.any() else 0.0,
    }
    if class_names is not None:
        for index, name in enumerate(class_names):
            if present[index]:
                metrics[f"IoU-{name}"] = 100.0 * float(iou[index])
    return metrics


class SemanticSegmentationEvaluator:
    """Accumulates per-image confusion matrices and reduces them (DDP-safe) into mIoU and accuracies."""

    def __init__(self, num_classes: int, ignore_index: int = 255, class_names: list[str] | None = None) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = class_names
        self.reset()

    def reset(self) -> None:
        """Forget every accumulated image."""
        self._per_image: dict[Hashable, tuple[np.ndarray, np.ndarray]] = {}

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Add the model's ``sem_seg`` scores (K, H, W) of each image against its ``sem_seg_gt``."""
        for record, output in zip(inputs, outputs):
            if "sem_seg_gt" not in record:
                raise KeyError(f"evaluation record {record.get('file_name')} has no 'sem_seg_gt'")
            self.update(record["image_id"], output["sem_seg"].argmax(0), record["sem_seg_gt"])

    def update(self, image_id: Hashable, prediction: Tensor | np.ndarray, label: Tensor | np.ndarray) -> None:
        """Add one image: ``prediction`` and ``label`` are (H, W) integer class maps of the same size."""
        prediction = torch.as_tensor(prediction).long().flatten().cpu()
        label = torch.as_tensor(label).long().flatten().cpu()
        if prediction.shape != label.shape:
            raise ValueError(
                f"image {image_id!r}: prediction has {prediction.numel()} pixels, label has {label.numel()}"
            )
        keep = label != self.ignore_index
        prediction, label = prediction[keep], label[keep]
        bad_labels = (label < 0) | (label >= self.num_classes)
        if bad_labels.any():
            raise ValueError(
                f"image {image_id!r}: label values {sorted(set(label[bad_labels].tolist()))[:10]} outside "
                f"[0, {self.num_classes}) and not ignore_index={self.ignore_index}"
            )
        if ((prediction < 0) | (prediction >= self.num_classes)).any():
            raise ValueError(f"image {image_id!r}: predicted class outside [0, {self.num_classes})")
        pair_counts = torch.bincount(label * self.num_classes + prediction)
        nonzero = pair_counts.nonzero().flatten()
        self._per_image[image_id] = (nonzero.numpy().astype(np.int64), pair_counts[nonzero].numpy().astype(np.int64))

    def confusion_matrix(self) -> np.ndarray:
        """The (K, K) dataset confusion matrix over all ranks, each image id counted once."""
        merged = gather_unique_by_key(self._per_image)
        confusion = np.zeros(self.num_classes * self.num_classes, dtype=np.int64)
        for indices, counts in merged.values():
            np.add.at(confusion, indices, counts)
        return confusion.reshape(self.num_classes, self.num_classes)

    def evaluate(self) -> dict[str, float]:
        """mIoU, fwIoU, pACC, mACC in percent (plus per-class IoU when class names were given)."""
        return confusion_matrix_metrics(self.confusion_matrix(), self.class_names)

    def __len__(self) -> int:
        return len(self._per_image)

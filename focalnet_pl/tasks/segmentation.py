"""Mask2Former semantic / panoptic segmentation: :class:`~focalnet_pl.tasks.detection.DetectionTask` with
Mask2Former's recipe as defaults.

Everything else follows from the config and the data: the evaluators from the data's ``evaluator_type``
and the model's outputs (mIoU as detectron2's ``SemSegEvaluator``, PQ/SQ/RQ as panopticapi and, for
panoptic models with ``INSTANCE_ON``, box-free mask AP by pycocotools), the drawings (colour panoptic /
semantic overlays) and ``segments.json`` from the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from focalnet_pl.reliability import NonFiniteAction
from focalnet_pl.tasks.detection import DetectionTask

__all__ = ["SegmentationTask"]


class SegmentationTask(DetectionTask):
    """Train, evaluate (mIoU, PQ) and run Mask2Former built from a detectron2 config dict.

    The arguments are :class:`DetectionTask`'s (every one, so that a checkpoint records them all), with
    Mask2Former's defaults: weight decay by module type
    (``weight_decay_norm`` for normalisation layers and ``weight_decay_embed`` for ``nn.Embedding``
    tables, detectron2's ``SOLVER.WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED``, 0 in every Mask2Former
    recipe; biases decay), the poly schedule (``lr_schedule: step`` for the COCO recipes), no warmup
    factor, and ``monitor`` ``None`` = PQ for panoptic configs, mIoU otherwise.
    """

    def __init__(
        self,
        detectron2: dict[str, Any] | None = None,
        lr: float = 1e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.05,
        param_groups: Literal["by_name", "by_module_type"] = "by_module_type",
        weight_decay_all: bool = False,
        weight_decay_norm: float = 0.0,
        weight_decay_embed: float = 0.0,
        lr_schedule: Literal["poly", "step"] = "poly",
        max_steps: int | None = None,
        poly_power: float = 0.9,
        lr_decay_epochs: Sequence[int] = (),
        lr_decay_factor: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 1.0,
        score_threshold: float = 0.5,
        overlay_alpha: float = 0.5,
        predict_output_dir: str = "predictions",
        on_nonfinite_loss: NonFiniteAction = "raise",
        checkpoint_every_n_steps: int | None = None,
        log_samples: int = 4,
        weights: str | None = None,
        monitor: str | None = None,
        monitor_mode: Literal["max", "min"] = "max",
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(
            detectron2=detectron2, lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay,
            param_groups=param_groups, weight_decay_all=weight_decay_all, weight_decay_norm=weight_decay_norm,
            weight_decay_embed=weight_decay_embed, lr_schedule=lr_schedule, max_steps=max_steps, poly_power=poly_power,
            lr_decay_epochs=lr_decay_epochs, lr_decay_factor=lr_decay_factor, warmup_iters=warmup_iters,
            warmup_factor=warmup_factor, score_threshold=score_threshold, overlay_alpha=overlay_alpha, predict_output_dir=predict_output_dir, on_nonfinite_loss=on_nonfinite_loss,
            checkpoint_every_n_steps=checkpoint_every_n_steps, log_samples=log_samples, weights=weights,
            monitor=monitor, monitor_mode=monitor_mode, ema_decay=ema_decay,
        )
        if self.meta_architecture != "Mask2Former":
            raise ValueError(f"SegmentationTask trains Mask2Former; the config builds {self.meta_architecture!r}")

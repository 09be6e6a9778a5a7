"""LightningModule for Mask2Former semantic / panoptic segmentation.

Reuses :class:`~focalnet_pl.tasks.detection.DetectionTask` (detectron2 config dict, model building,
checkpoint checks, EventStorage training step, AdamW with a backbone learning rate) and replaces its
weight-decay grouping (Mask2Former's: biases decay, norms and embeddings do not), its evaluation
(mIoU as detectron2's ``SemSegEvaluator``, PQ/SQ/RQ as panopticapi and, for panoptic models with
``INSTANCE_ON``, box-free mask AP by pycocotools), its schedule (poly decay over iterations as in
Mask2Former's ADE20K recipes, or step decay by epoch) and its drawings (colour panoptic / semantic overlays).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from detectron2.data import Metadata
from PIL import Image
from torch import nn

import focalnet_pl.mask2former  # noqa: F401  (registers Mask2Former and its config keys)
from focalnet_pl.evaluation.coco import COCO_METRIC_NAMES, COCOInstanceEvaluator
from focalnet_pl.evaluation.gather import gather_unique_by_key
from focalnet_pl.evaluation.panoptic import PanopticQualityEvaluator
from focalnet_pl.evaluation.semantic import SemanticSegmentationEvaluator
from focalnet_pl.mask2former import Mask2Former
from focalnet_pl.optim import module_type_param_groups
from focalnet_pl.reliability import NonFiniteAction
from focalnet_pl.detector_weights import load_detector_weights
from focalnet_pl.tasks.detection import DetectionTask

__all__ = ["SegmentationTask", "format_segmentation_table"]

_SUMMARY_KEYS = (
    "PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "mIoU", "fwIoU", "pACC", "mACC",
    *(f"segm_{name}" for name in COCO_METRIC_NAMES),
)


def format_segmentation_table(metrics: dict[str, float], title: str) -> str:
    """The summary metrics as an aligned two-column text table."""
    rows = [(name, metrics[name]) for name in _SUMMARY_KEYS if name in metrics]
    width = max(len(name) for name, _ in rows) if rows else 0
    return "\n".join([title, *(f"  {name:<{width}}  {value:7.3f}" for name, value in rows)])


class SegmentationTask(DetectionTask):
    """Train, evaluate (mIoU, PQ) and run Mask2Former built from a detectron2 config dict.

    Args (besides :class:`DetectionTask`'s ``detectron2``, ``lr``, ``backbone_lr``, ``weight_decay``,
    ``lr_decay_epochs``, ``lr_decay_factor``, ``warmup_iters``, ``warmup_factor``, ``predict_output_dir``,
    ``monitor`` (``None``: PQ for panoptic configs, mIoU otherwise), ``monitor_mode`` and ``ema_decay``):
        weight_decay_norm, weight_decay_embed: weight decay of normalisation layers and of
            ``nn.Embedding`` tables (detectron2's ``SOLVER.WEIGHT_DECAY_NORM`` / ``WEIGHT_DECAY_EMBED``,
            0 in every Mask2Former recipe); all other parameters, biases included, get ``weight_decay``.
        lr_schedule: ``poly``: ``(1 - step / max_steps) ** poly_power`` (Mask2Former ADE20K);
            ``step``: multiply by ``lr_decay_factor`` at each of ``lr_decay_epochs`` (COCO).
        max_steps: length of the poly schedule; ``None`` = the trainer's total optimizer steps.
        poly_power: exponent of the poly schedule.
        overlay_alpha: opacity of the segments drawn by ``predict``.
    """

    def __init__(
        self,
        detectron2: dict[str, Any] | None = None,
        lr: float = 1e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.05,
        weight_decay_norm: float = 0.0,
        weight_decay_embed: float = 0.0,
        lr_schedule: Literal["poly", "step"] = "poly",
        max_steps: int | None = None,
        poly_power: float = 0.9,
        lr_decay_epochs: Sequence[int] = (),
        lr_decay_factor: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 1.0,
        overlay_alpha: float = 0.5,
        predict_output_dir: str = "predictions",
        on_nonfinite_loss: NonFiniteAction = "raise",
        checkpoint_every_n_steps: int | None = None,
        log_samples: int = 4,
        monitor: str | None = None,
        monitor_mode: Literal["max", "min"] = "max",
        ema_decay: float | None = None,
    ) -> None:
        super().__init__(
            detectron2=detectron2, lr=lr, backbone_lr=backbone_lr, weight_decay=weight_decay,
            lr_decay_epochs=lr_decay_epochs, lr_decay_factor=lr_decay_factor, warmup_iters=warmup_iters,
            warmup_factor=warmup_factor, predict_output_dir=predict_output_dir,
            on_nonfinite_loss=on_nonfinite_loss, checkpoint_every_n_steps=checkpoint_every_n_steps,
            log_samples=log_samples, monitor=monitor, monitor_mode=monitor_mode,
            ema_decay=ema_decay,
        )
        self.save_hyperparameters()
        if self.meta_architecture != "Mask2Former":
            raise ValueError(f"SegmentationTask trains Mask2Former; the config builds {self.meta_architecture!r}")
        if lr_schedule not in ("poly", "step"):
            raise ValueError(f"lr_schedule must be 'poly' or 'step', got {lr_schedule!r}")
        self._semantic: SemanticSegmentationEvaluator | None = None
        self._panoptic: PanopticQualityEvaluator | None = None
        self._instances: COCOInstanceEvaluator | None = None

    @property
    def monitor_metric(self) -> str:
        """``monitor``, else PQ for panoptic configs and mIoU otherwise."""
        return self.hparams.monitor or ("val/PQ" if self.cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON else "val/mIoU")

    # ---- model and data -----------------------------------------------------------------------
    def _mask2former(self) -> Mask2Former:
        model = self._require_model()
        assert isinstance(model, Mask2Former)
        return model

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._apply_thing_classes(self._datamodule_metadata())

    def _datamodule_metadata(self) -> Metadata | None:
        datamodule = self._datamodule()
        try:
            return datamodule.metadata if datamodule is not None else None
        except (AttributeError, ValueError):
            return None

    def _apply_thing_classes(self, metadata: Metadata | None) -> None:
        """Thing classes for panoptic/instance inference: the config's, else the datamodule's."""
        data_things = getattr(metadata, "thing_class_ids", None) if metadata is not None else None
        configured = list(self.cfg.MODEL.MASK_FORMER.THING_CLASS_IDS)
        model = self._mask2former()
        if configured:
            panoptic_data = getattr(metadata, "evaluator_type", "") == "panoptic"
            if data_things is not None and panoptic_data and sorted(configured) != sorted(data_things):
                raise ValueError(
                    f"detectron2.MODEL.MASK_FORMER.THING_CLASS_IDS={configured} differ from the datamodule's thing "
                    f"classes {sorted(data_things)}"
                )
        elif data_things is not None:
            model.thing_class_ids = set(int(i) for i in data_things)

    def _load_model_weights(self) -> None:
        """``MODEL.WEIGHTS``: a full Mask2Former checkpoint (official or ours); class rows are chosen by the
        datamodule's category ids. With ``MODEL.FOCALNET.WEIGHTS`` set the backbone comes from there and the
        checkpoint's backbone tensors (FocalNet or, from the official releases, Swin / ResNet) are skipped."""
        metadata = self._datamodule_metadata()
        class_ids = None
        if metadata is not None and metadata.get("stuff_dataset_id_to_contiguous_id", None):
            to_dataset = {v: k for k, v in metadata.stuff_dataset_id_to_contiguous_id.items()}
            class_ids = [to_dataset[i] for i in range(len(to_dataset))]
        backbone_elsewhere = bool(self.cfg.MODEL.FOCALNET.WEIGHTS)
        self.weights_report = load_detector_weights(
            self._require_model(), self.cfg.MODEL.WEIGHTS, class_ids=class_ids,
            checkpoint_filter=(lambda key: not key.startswith("backbone.")) if backbone_elsewhere else None,
        )

    def _group_parameters(self, model: nn.Module, lr_scale: dict[str, float]) -> list[dict]:
        """Mask2Former's weight-decay rule (see :func:`focalnet_pl.optim.module_type_param_groups`)."""
        return module_type_param_groups(
            model, self.hparams.weight_decay, lr_scale, self.hparams.weight_decay_norm, self.hparams.weight_decay_embed
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["segmentation"] = {"thing_class_ids": sorted(self._mask2former().thing_class_ids)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        info = checkpoint.get("segmentation", {})
        if info.get("thing_class_ids") and not self.cfg.MODEL.MASK_FORMER.THING_CLASS_IDS:
            self._mask2former().thing_class_ids = set(info["thing_class_ids"])

    # ---- schedule -----------------------------------------------------------------------------
    def lr_factor(self, step: int, epoch: int) -> float:
        """Multiplier of the base learning rates at optimizer ``step`` during ``epoch``."""
        if self.hparams.lr_schedule == "step":
            return super().lr_factor(step, epoch)
        max_steps = self.hparams.max_steps
        if max_steps is None:
            max_steps = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        factor = max(0.0, 1.0 - step / max(1, max_steps)) ** self.hparams.poly_power
        warmup = self.hparams.warmup_iters
        if step < warmup:
            alpha = step / warmup
            factor *= self.hparams.warmup_factor * (1 - alpha) + alpha
        return factor

    # ---- evaluation ---------------------------------------------------------------------------
    def _start_evaluation(self, split: str) -> None:
        model = self._mask2former()
        metadata = self._datamodule_metadata()
        if metadata is None:
            raise ValueError("segmentation evaluation needs a datamodule with metadata (ADE20K / panoptic datamodules)")
        names = list(metadata.stuff_classes)
        self._semantic = SemanticSegmentationEvaluator(len(names), 255, names) if model.semantic_on else None
        self._panoptic = self._instances = None
        if model.panoptic_on and metadata.evaluator_type == "panoptic":
            self._panoptic = PanopticQualityEvaluator(range(len(names)), model.thing_class_ids)
        if model.instance_on and metadata.evaluator_type == "panoptic":
            to_dataset = {v: k for k, v in metadata.stuff_dataset_id_to_contiguous_id.items()}
            self._instances = COCOInstanceEvaluator(self._datamodule().instance_ground_truth(), to_dataset, ("segm",))
        if self._semantic is None and self._panoptic is None:
            raise ValueError(
                f"nothing to evaluate: a {metadata.evaluator_type} dataset needs "
                f"MODEL.MASK_FORMER.TEST.{'PANOPTIC' if metadata.evaluator_type == 'panoptic' else 'SEMANTIC'}_ON"
            )

    def _evaluation_step(self, batch: list[dict]) -> None:
        outputs = self._require_model()(batch)
        for record, output in zip(batch, outputs):
            if self._semantic is not None:
                if "sem_seg_gt" not in record:
                    raise KeyError(f"evaluation record {record.get('file_name')} has no 'sem_seg_gt'")
                self._semantic.update(record["image_id"], output["sem_seg"].argmax(0), record["sem_seg_gt"])
            if self._panoptic is not None:
                segment_map, segments = output["panoptic_seg"]
                self._panoptic.update(
                    record["image_id"], segment_map, segments, record["pan_seg_gt"], record["segments_info"]
                )
        if self._instances is not None:
            self._instances.process(batch, outputs)

    def _finish_evaluation(self, stage: str) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self._panoptic is not None:
            metrics.update(self._panoptic.compute())
        if self._semantic is not None:
            metrics.update(self._semantic.compute())
        if self._instances is not None:
            metrics.update(self._instances.evaluate(self._output_dir(), file_prefix=f"{stage}_"))
        summary = {name: value for name, value in metrics.items() if name in _SUMMARY_KEYS}
        self.log_dict({f"{stage}/{name}": value for name, value in summary.items()}, sync_dist=False)
        if self.trainer.is_global_zero:
            epoch = f" (epoch {self.current_epoch})" if stage == "val" else ""
            print(format_segmentation_table(metrics, f"segmentation {stage}{epoch}:"), flush=True)
            out = self._output_dir()
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{stage}_segmentation_metrics.json").write_text(json.dumps(metrics, indent=1))
        self._semantic = self._panoptic = self._instances = None
        return metrics

    # ---- prediction ---------------------------------------------------------------------------
    def _predict_metadata(self) -> Metadata:
        metadata = self._datamodule_metadata()
        if metadata is not None:
            return metadata
        names = [f"class_{i}" for i in range(self.num_classes or 0)]
        return Metadata(name="segmentation", thing_classes=names, stuff_classes=names)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        from datamodules.image_io import read_image_rgb  # noqa: PLC0415 (datamodules is a sibling package)

        outputs = self._require_model()(batch)
        results = []
        for record, output in zip(batch, outputs):
            image_rgb = np.asarray(read_image_rgb(record["file_name"]))
            summary: dict[str, Any] = {"image_id": record["image_id"], "file_name": str(record["file_name"])}
            if "panoptic_seg" in output:
                summary["segments_info"] = output["panoptic_seg"][1]
            drawn = self.render_output(image_rgb, output, self._predict_meta)
            Image.fromarray(drawn).save(Path(self.hparams.predict_output_dir) / f"{Path(record['file_name']).stem}.png")
            self._predictions[str(record["image_id"])] = (summary, [])
            results.append(summary)
        return results

    def render_output(self, image_rgb: np.ndarray, output: dict, metadata: Metadata) -> np.ndarray:
        """Colour panoptic overlay (or semantic, when the model gives no panoptic output)."""
        from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: PLC0415 (needs OpenCV)

        visualizer = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
        if "panoptic_seg" in output:
            segment_map, segments = output["panoptic_seg"]
            drawn = visualizer.draw_panoptic_seg(segment_map.cpu(), segments, alpha=self.hparams.overlay_alpha)
        else:
            drawn = visualizer.draw_sem_seg(output["sem_seg"].argmax(0).cpu(), alpha=self.hparams.overlay_alpha)
        return drawn.get_image()

    def on_predict_epoch_end(self) -> None:
        merged = gather_unique_by_key(self._predictions)
        if self.trainer.is_global_zero:
            out = Path(self.hparams.predict_output_dir)
            summaries = [merged[key][0] for key in sorted(merged)]
            (out / "segments.json").write_text(json.dumps(summaries))
            print(f"predict: wrote {len(summaries)} overlays and segments.json to {out}", flush=True)
        self._predictions = {}

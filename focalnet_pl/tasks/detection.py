"""One LightningModule for every detectron2 meta-architecture (Mask R-CNN, DINO, Mask2Former).

The task is glue between parts it is given or builds from its arguments:

* the model (with its loss): whatever ``build_model`` makes of the ``detectron2`` config dict, for the
  classes of the data (or of a checkpoint);
* the data: read only through :class:`~focalnet_pl.tasks.data.DetectronData`;
* the optimizer: AdamW over :func:`focalnet_pl.optim.detector_param_groups` (``param_groups`` rule), its
  schedule :func:`focalnet_pl.optim.lr_factor`;
* the evaluation: a :class:`focalnet_pl.evaluation.EvaluationRun` per stage, with the evaluators of
  :func:`focalnet_pl.evaluation.build_evaluators` for the data's ``evaluator_type`` and the model's outputs
  (COCO AP, PQ, mIoU);
* the checkpoint record (classes, architecture), its checks and the detector weights it starts from
  (``weights``): :mod:`focalnet_pl.tasks.checkpoint`;
* the prediction files: the writers of :mod:`focalnet_pl.tasks.writers` (:func:`~focalnet_pl.tasks.writers.detectron2_writers`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import Metadata
from detectron2.data.detection_utils import read_image
from detectron2.modeling import build_model
from detectron2.modeling.backbone import ResNet
from detectron2.utils.events import EventStorage
from lightning.pytorch.callbacks import Callback
from torch import nn

from focalnet_pl.architecture import ARCHITECTURE_KEY, check_architecture, require_task_checkpoint
from focalnet_pl.d2.backbone import FocalNetBackbone
from focalnet_pl.d2.config import NUM_CLASSES_KEYS, build_detectron2_cfg, get_dotted, has_dotted
from focalnet_pl.d2.partial_masks import train_masks_where_annotated
from focalnet_pl.detector_weights import DetectorLoadReport
from focalnet_pl.distributed import maybe_fully_shard
from focalnet_pl.ema import continue_from_trained_weights
from focalnet_pl.evaluation import EvaluationRun
from focalnet_pl.focalnet import FocalNetBlock
from focalnet_pl.optim import lr_factor as schedule_factor
from focalnet_pl.optim import detector_param_groups
from focalnet_pl.reliability import NonFiniteAction, NonFiniteLossGuard
from focalnet_pl.tasks.callbacks import default_task_callbacks
from focalnet_pl.tasks.checkpoint import (
    CLASS_FIELDS,
    CLASSES_KEY,
    check_state_dict,
    class_record,
    detection_architecture,
    load_initial_weights,
    saved_classes,
)
from focalnet_pl.tasks.data import DetectronData, data_interface
from focalnet_pl.tasks.writers import detectron2_writers
from focalnet_pl.visualize.draw import draw_detectron2_output

__all__ = ["CLASS_FIELDS", "DetectionTask", "output_kinds"]

log = logging.getLogger(__name__)

#: FSDP2 units of the detectors (class names absent from a model are ignored)
FSDP_BLOCK_TYPES = (
    FocalNetBlock,
    "focalnet_pl.layers.deformable_encoder.DeformableEncoderLayer",
    "focalnet_pl.dino.transformer.DecoderLayer",
)

#: the config key of each meta-architecture's thing classes (panoptic inference), when it has one
THING_CLASS_IDS_KEYS: dict[str, str] = {"Mask2Former": "MODEL.MASK_FORMER.THING_CLASS_IDS"}

def output_kinds(cfg: CfgNode) -> frozenset[str]:
    """What the model of ``cfg`` outputs (:data:`focalnet_pl.evaluation.OUTPUT_KINDS`)."""
    if cfg.MODEL.META_ARCHITECTURE == "Mask2Former":
        test = cfg.MODEL.MASK_FORMER.TEST
        flags = {"sem_seg": test.SEMANTIC_ON, "panoptic_seg": test.PANOPTIC_ON, "instances": test.INSTANCE_ON,
                 "masks": test.INSTANCE_ON}
        return frozenset(kind for kind, on in flags.items() if on)
    return frozenset({"instances", "masks"} if cfg.MODEL.MASK_ON else {"instances"})


def _set_dotted(cfg: CfgNode, key: str, value: Any) -> None:
    parent, name = key.rsplit(".", 1)
    get_dotted(cfg, parent)[name] = value


class DetectionTask(L.LightningModule):
    """Train, evaluate and run any detectron2 model built from a config dict.

    Args:
        detectron2: nested dict merged into detectron2's default config (plus every registered
            extension, e.g. ``MODEL.FOCALNET``); see :func:`focalnet_pl.d2.build_detectron2_cfg`.
            The number of classes comes from the datamodule when the dict does not set it.
        lr: AdamW learning rate of everything but the backbone.
        backbone_lr: learning rate of the (FocalNet / ResNet) backbone; ``None`` = ``lr``.
        weight_decay: AdamW weight decay.
        param_groups: which parameters get no weight decay: ``by_name``: norms, biases, layer scale,
            position embeddings (:func:`focalnet_pl.optim.param_groups`); ``by_module_type``: the
            parameters of normalisation layers get ``weight_decay_norm``, of ``nn.Embedding``
            ``weight_decay_embed``, all others, biases included, ``weight_decay`` (Mask2Former's rule,
            :func:`focalnet_pl.optim.module_type_param_groups`).
        weight_decay_all: ``by_name`` rule only: weight decay on every parameter (the official DINO
            optimizer, ``param_dict_type='default'``).
        lr_schedule: ``step``: multiply by ``lr_decay_factor`` from each of ``lr_decay_epochs`` (0-based)
            on; ``poly``: ``(1 - step / max_steps) ** poly_power`` (see :func:`focalnet_pl.optim.lr_factor`).
        max_steps: length of the poly schedule; ``None`` = the trainer's total optimizer steps.
        warmup_iters: linear warmup from ``warmup_factor * lr`` over this many optimizer steps.
        score_threshold: minimum score of the instances drawn by ``predict`` and the sample logger.
        overlay_alpha: opacity of the segments drawn.
        predict_output_dir: where ``predict`` writes the drawn images and the results json.
        on_nonfinite_loss: ``"raise"`` stops at a NaN/Inf loss naming the step and loss terms;
            ``"skip"`` skips that optimizer step.
        checkpoint_every_n_steps: also refresh ``last.ckpt`` every that many steps (mid-epoch resume).
        log_samples: validation images drawn with their predictions sent to TensorBoard each validation (0: off).
        weights: full detector checkpoint to start from or evaluate (path, https URL or ``zoo:NAME``,
            e.g. ``zoo:mask_rcnn_focalnet_t_srf_1x``); replaces ``MODEL.WEIGHTS`` when given. With
            ``MODEL.FOCALNET.WEIGHTS`` set, the FocalNet backbone comes from that file instead.
        monitor, monitor_mode: metric (and whether higher is better) of the default ``ModelCheckpoint``,
            used when the trainer has no ``ModelCheckpoint`` of its own; ``None``: ``val/PQ`` for
            panoptic outputs, ``val/mIoU`` for semantic ones, else ``val/AP`` (boxes).
        ema_decay: keep an exponential moving average of the weights with this decay, validate, test,
            predict, checkpoint and export it (:class:`focalnet_pl.ema.ModelEMA`); ``None``: off.
    """

    def __init__(
        self,
        detectron2: dict[str, Any] | None = None,
        lr: float = 1e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.05,
        param_groups: Literal["by_name", "by_module_type"] = "by_name",
        weight_decay_all: bool = False,
        weight_decay_norm: float = 0.0,
        weight_decay_embed: float = 0.0,
        lr_schedule: Literal["step", "poly"] = "step",
        lr_decay_epochs: Sequence[int] = (),
        lr_decay_factor: float = 0.1,
        max_steps: int | None = None,
        poly_power: float = 0.9,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
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
        super().__init__()
        self.save_hyperparameters()
        if param_groups not in ("by_name", "by_module_type"):
            raise ValueError(f"param_groups must be 'by_name' or 'by_module_type', got {param_groups!r}")
        if lr_schedule not in ("poly", "step"):
            raise ValueError(f"lr_schedule must be 'poly' or 'step', got {lr_schedule!r}")
        self.loss_guard = NonFiniteLossGuard(on_nonfinite_loss)
        overrides = detectron2 or {}
        self.cfg: CfgNode = build_detectron2_cfg(overrides)
        if weights and self.cfg.MODEL.WEIGHTS and weights != self.cfg.MODEL.WEIGHTS:
            log.info("weights=%s replaces detectron2.MODEL.WEIGHTS=%s", weights, self.cfg.MODEL.WEIGHTS)
        self.weights_source: str = weights or self.cfg.MODEL.WEIGHTS
        self.meta_architecture: str = self.cfg.MODEL.META_ARCHITECTURE
        if self.meta_architecture not in NUM_CLASSES_KEYS:
            raise ValueError(
                f"meta-architecture {self.meta_architecture!r} has no entry in focalnet_pl.d2.config.NUM_CLASSES_KEYS "
                f"(known: {sorted(NUM_CLASSES_KEYS)}); register the config key holding its number of classes"
            )
        self.output_kinds = output_kinds(self.cfg)
        self.num_classes_key = NUM_CLASSES_KEYS[self.meta_architecture]
        self.thing_class_ids_key = THING_CLASS_IDS_KEYS.get(self.meta_architecture)
        self.configured_num_classes: int | None = (
            get_dotted(self.cfg, self.num_classes_key) if has_dotted(overrides, self.num_classes_key) else None
        )
        self.num_classes: int | None = None
        self.model: nn.Module | None = None
        self._class_metadata: Metadata | None = None
        if self.configured_num_classes is not None:
            self._build_model(self.configured_num_classes, None)
        self.evaluation = EvaluationRun(self.output_kinds)
        self.weights_report: DetectorLoadReport | None = None

    # ---- model and classes --------------------------------------------------------------------
    def _build_model(self, num_classes: int, thing_class_ids: Sequence[int] | None) -> None:
        cfg = self.cfg.clone()
        cfg.defrost()
        _set_dotted(cfg, self.num_classes_key, int(num_classes))
        if self.thing_class_ids_key and thing_class_ids is not None and not get_dotted(cfg, self.thing_class_ids_key):
            _set_dotted(cfg, self.thing_class_ids_key, [int(i) for i in thing_class_ids])
        cfg.MODEL.DEVICE = "cpu"  # Lightning moves the module
        cfg.freeze()
        self.model = build_model(cfg)
        train_masks_where_annotated(self.model)  # objects annotated with a box only train no mask
        self.num_classes = int(num_classes)

    def _use_classes(self, metadata: Metadata, source: str) -> None:
        """The one place the model's classes are settled, from the class ``metadata`` of the data or of a
        checkpoint (``source``): the model is built for them, or the built one must predict them."""
        num_classes = len(metadata.thing_classes)
        things = metadata.get("thing_class_ids", None)
        if self.configured_num_classes is not None and num_classes != self.configured_num_classes:
            raise ValueError(f"the config sets {self.num_classes_key}={self.configured_num_classes} but the "
                             f"{source} has {num_classes} classes")
        if self.model is None:
            self._build_model(num_classes, things)
        elif num_classes != self.num_classes:
            raise ValueError(f"the model predicts {self.num_classes} classes but the {source} has {num_classes}")
        configured_things = get_dotted(self.cfg, self.thing_class_ids_key) if self.thing_class_ids_key else None
        if configured_things and things is not None and metadata.get("evaluator_type", None) == "panoptic" \
                and sorted(configured_things) != sorted(things):
            raise ValueError(f"detectron2.{self.thing_class_ids_key}={list(configured_things)} differ from the "
                             f"{source}'s thing classes {sorted(things)}")
        if self._class_metadata is None:
            self._class_metadata = metadata
            if self.thing_class_ids_key and not configured_things and things is not None:
                self.model.thing_class_ids = {int(i) for i in things}  # a model built before the classes were known

    @property
    def class_metadata(self) -> Metadata:
        """Names, dataset ids (and colours, thing classes) of the model's classes: the data's, else the
        checkpoint's, else ``class_<i>`` with ids ``i``."""
        if self._class_metadata is not None:
            return self._class_metadata
        names = [f"class_{i}" for i in range(self.num_classes or 0)]
        identity = {i: i for i in range(len(names))}
        return Metadata(name="unnamed classes", thing_classes=names, stuff_classes=names,
                        thing_dataset_id_to_contiguous_id=identity, stuff_dataset_id_to_contiguous_id=identity)

    def _data(self) -> DetectronData | None:
        return data_interface(self._trainer, DetectronData, type(self).__name__)

    def setup(self, stage: str) -> None:
        data = self._data()
        if data is not None:
            if data.image_format != self.cfg.INPUT.FORMAT:
                raise ValueError(f"the datamodule gives {data.image_format} images but detectron2.INPUT.FORMAT is "
                                 f"{self.cfg.INPUT.FORMAT!r}")
            metadata = data.class_metadata
            if metadata is not None:
                self._use_classes(metadata, "datamodule")
        if self.weights_source and self.weights_report is None and self.model is not None:
            self.weights_report = load_initial_weights(self.model, self.weights_source, self._class_metadata,
                                                       keep_backbone=bool(self.cfg.MODEL.FOCALNET.WEIGHTS))

    def configure_model(self) -> None:
        """Shard with FSDP2 under ``FSDP2Strategy`` (no-op under other strategies, never twice)."""
        maybe_fully_shard(self, block_types=FSDP_BLOCK_TYPES)

    @property
    def monitor_metric(self) -> str:
        """The metric of the default ``ModelCheckpoint``: ``monitor``, else the task's own."""
        if self.hparams.monitor:
            return self.hparams.monitor
        return "val/PQ" if "panoptic_seg" in self.output_kinds else "val/mIoU" if "sem_seg" in self.output_kinds \
            else "val/AP"

    def configure_callbacks(self) -> list[Callback]:
        """The default callbacks the trainer lacks; under ``predict`` also the writers of the model's outputs."""
        hp = self.hparams
        callbacks = default_task_callbacks(self.trainer, self.monitor_metric, hp.monitor_mode,
                                           hp.checkpoint_every_n_steps, hp.log_samples, hp.ema_decay)
        if self.trainer.state.fn == "predict":
            callbacks += detectron2_writers(self.output_kinds, hp.predict_output_dir, hp.score_threshold,
                                            hp.overlay_alpha, self.trainer.callbacks)
        return callbacks

    def _require_model(self) -> nn.Module:
        """The detectron2 model; it is built once its number of classes is known: from the config,
        in ``setup`` from the datamodule, or when a checkpoint is restored."""
        if self.model is None:
            raise RuntimeError(
                f"number of classes unknown: set detectron2.{self.num_classes_key}, use a datamodule with "
                "annotated data (class_metadata), or restore a checkpoint (ckpt_path)"
            )
        return self.model

    def forward(self, batch: list[dict]) -> Any:
        return self._require_model()(batch)

    def onnx_export_spec(self) -> Any:
        """``cli.py export --format onnx``: DINO as images -> boxes, scores, labels
        (:func:`focalnet_pl.dino.onnx.dino_onnx_spec`), Mask2Former as images -> semantic scores and the
        query outputs (:func:`focalnet_pl.mask2former.onnx.mask2former_onnx_spec`). Others raise, saying why."""
        from focalnet_pl.dino import DINO
        from focalnet_pl.dino.onnx import dino_onnx_spec
        from focalnet_pl.mask2former import Mask2Former
        from focalnet_pl.mask2former.onnx import mask2former_onnx_spec

        model = self._require_model()
        if isinstance(model, Mask2Former):
            return mask2former_onnx_spec(model, self.cfg.INPUT.FORMAT)
        if not isinstance(model, DINO):
            raise NotImplementedError(
                f"{self.meta_architecture} has no ONNX export: detectron2's proposal and detection post-processing "
                "decide in Python on tensor values (e.g. find_top_rpn_proposals' `if not valid_mask.all()`, NMS keeping "
                "a data-dependent number of boxes), which torch.export, the ONNX exporter's tracer, cannot follow. "
                "DINO (MODEL.META_ARCHITECTURE: DINO) exports; the FocalNet backbone exports with "
                "`cli.py export --format safetensors --part backbone`."
            )
        return dino_onnx_spec(model, list(self.class_metadata.thing_classes), self.cfg.INPUT.FORMAT)

    # ---- checkpoints --------------------------------------------------------------------------
    def architecture(self) -> dict[str, Any]:
        """What this task's checkpoints record of the model (see :mod:`focalnet_pl.architecture`)."""
        data = self._data()
        return detection_architecture(self.cfg, self._require_model(), self.num_classes, self._class_metadata,
                                      data.eval_size if data is not None else None)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CLASSES_KEY] = class_record(self.meta_architecture, self.num_classes, self._class_metadata)
        checkpoint[ARCHITECTURE_KEY] = self.architecture()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        require_task_checkpoint(checkpoint, "model.init_args.weights (MODEL.WEIGHTS)")
        continue_from_trained_weights(self._trainer, checkpoint)
        metadata, num_classes = saved_classes(checkpoint, self.meta_architecture)
        if metadata is not None:
            self._use_classes(metadata, "checkpoint")
        elif self.model is None:
            self._build_model(num_classes, None)
        check_architecture(checkpoint.get(ARCHITECTURE_KEY), self.architecture())
        if num_classes != self.num_classes:
            raise ValueError(f"checkpoint model predicts {num_classes} classes but this one predicts {self.num_classes}")
        check_state_dict(self.state_dict(), checkpoint.get("state_dict", {}))

    # ---- training -----------------------------------------------------------------------------
    def training_step(self, batch: list[dict], batch_idx: int) -> torch.Tensor:
        with EventStorage(self.global_step):
            losses: dict[str, torch.Tensor] = self._require_model()(batch)
        total = sum(losses.values())
        if self.loss_guard(total, losses, step=self.global_step, epoch=self.current_epoch) is None:
            return None  # non-finite loss, skipped by configuration
        batch_size = len(batch)
        self.log_dict({f"train/{name}": value.detach() for name, value in losses.items()}, batch_size=batch_size)
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        return total

    def parameter_groups(self) -> list[dict]:
        """AdamW groups by the ``param_groups`` rule, each with its ``lr``: the FocalNet / ResNet backbone
        gets ``backbone_lr`` (:func:`focalnet_pl.optim.detector_param_groups`)."""
        hp = self.hparams
        return detector_param_groups(self._require_model(), hp.param_groups, hp.lr, hp.weight_decay,
                                     (FocalNetBackbone, ResNet), hp.backbone_lr, decay_all=hp.weight_decay_all,
                                     weight_decay_norm=hp.weight_decay_norm, weight_decay_embed=hp.weight_decay_embed)

    def lr_factor(self, step: int, epoch: int) -> float:
        """Multiplier of the base learning rates at optimizer ``step`` during ``epoch``."""
        hp = self.hparams
        total = hp.max_steps
        if total is None and hp.lr_schedule == "poly":
            total = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        return schedule_factor(step, epoch, decay=hp.lr_schedule, warmup_steps=hp.warmup_iters,
                               warmup_factor=hp.warmup_factor, decay_epochs=hp.lr_decay_epochs,
                               decay_factor=hp.lr_decay_factor, total_steps=total or 1, power=hp.poly_power)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

        def factor(step: int) -> float:
            return self.lr_factor(step, self.trainer.current_epoch if self._trainer is not None else 0)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation (focalnet_pl.evaluation.EvaluationRun) -----------------------------------
    def _start_evaluation(self, stage: str) -> None:
        self.evaluation.start(stage, self._data(), self.trainer.log_dir or self.trainer.default_root_dir,
                              self.current_epoch if stage == "val" else None)

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._start_evaluation("val")

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        outputs = self._require_model()(batch)
        if not self.trainer.sanity_checking:
            self.evaluation.process(batch, outputs)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:  # gathered: identical on every rank, syncing averages equal values
            self.log_dict(self.evaluation.finish(self.trainer.is_global_zero), sync_dist=True)

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self.evaluation.process(batch, self._require_model()(batch))

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation.finish(self.trainer.is_global_zero), sync_dist=True)

    # ---- prediction ---------------------------------------------------------------------------
    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        """One dict per image: ``image`` (``id``, ``file_name``, ``height``, ``width``) and the model's
        outputs; the writers (:meth:`configure_callbacks`) turn them into files."""
        outputs = self._require_model()(batch)
        return [{"image": {"id": record["image_id"], "file_name": record["file_name"], "height": record["height"],
                           "width": record["width"]}, **output} for record, output in zip(batch, outputs)]

    def visualize_batch(self, batch: list[dict], max_images: int) -> list[tuple[str, np.ndarray]]:
        """Validation images with the predictions drawn (for :class:`SamplePredictionLogger`)."""
        records = batch[:max_images]
        with torch.no_grad():
            outputs = self._require_model()(records)
        hp = self.hparams
        return [(f"val_samples/{Path(r['file_name']).stem}",
                 draw_detectron2_output(read_image(r["file_name"], format="RGB"), o, self.class_metadata,
                                        hp.score_threshold, hp.overlay_alpha))
                for r, o in zip(records, outputs)]

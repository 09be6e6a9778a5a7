"""One LightningModule for every detectron2 meta-architecture (Mask R-CNN, DINO, ...).

The model is whatever ``build_model`` makes of the ``detectron2`` config dict; this module adds the
training loop glue (detectron2 ``EventStorage``, loss logging, AdamW with parameter groups, step
decay with warmup), COCO evaluation for validate/test and drawing + COCO json for predict.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
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
from PIL import Image
from torch import nn

from focalnet_pl.architecture import ARCHITECTURE_KEY, check_architecture, focalnet_settings, require_task_checkpoint
from focalnet_pl.d2.backbone import FocalNetBackbone
from focalnet_pl.d2.config import NUM_CLASSES_KEYS, build_detectron2_cfg, get_dotted, has_dotted
from focalnet_pl.d2.partial_masks import train_masks_where_annotated
from focalnet_pl.detector_weights import DetectorLoadReport, load_detector_weights
from focalnet_pl.evaluation.coco import COCOInstanceEvaluator, format_coco_table, instances_to_coco_results
from focalnet_pl.evaluation.gather import gather_unique_by_key
from focalnet_pl.distributed import maybe_fully_shard
from focalnet_pl.focalnet import FocalNetBlock
from focalnet_pl.optim import param_groups
from focalnet_pl.reliability import NonFiniteAction, NonFiniteLossGuard
from focalnet_pl.tasks.callbacks import default_task_callbacks

__all__ = ["DetectionTask"]

log = logging.getLogger(__name__)

#: FSDP2 units of the detectors (class names absent from a model are ignored)
FSDP_BLOCK_TYPES = (
    FocalNetBlock,
    "focalnet_pl.dino.transformer.EncoderLayer",
    "focalnet_pl.dino.transformer.DecoderLayer",
    "focalnet_pl.mask2former.pixel_decoder.DeformableEncoderLayer",
)


class DetectionTask(L.LightningModule):
    """Train, evaluate (COCO AP) and run any detectron2 detector built from a config dict.

    Args:
        detectron2: nested dict merged into detectron2's default config (plus every registered
            extension, e.g. ``MODEL.FOCALNET``); see :func:`focalnet_pl.d2.build_detectron2_cfg`.
            The number of classes comes from the datamodule when the dict does not set it.
        lr: AdamW learning rate of everything but the backbone.
        backbone_lr: learning rate of the (FocalNet / ResNet) backbone; ``None`` = ``lr``.
        weight_decay: AdamW weight decay (not applied to norms, biases, layer scale, position embeddings
            unless ``weight_decay_all``).
        weight_decay_all: weight decay on every parameter, norms and biases included (the official DINO
            optimizer, ``param_dict_type='default'``).
        lr_decay_epochs: epochs (0-based) from which the learning rate is multiplied by another
            ``lr_decay_factor`` (mmdetection's ``step``).
        warmup_iters: linear warmup from ``warmup_factor * lr`` over this many optimizer steps.
        score_threshold: minimum score of the detections drawn by ``predict``.
        predict_output_dir: where ``predict`` writes the drawn images and ``coco_results.json``.
        on_nonfinite_loss: ``"raise"`` stops at a NaN/Inf loss naming the step and loss terms;
            ``"skip"`` skips that optimizer step.
        checkpoint_every_n_steps: also refresh ``last.ckpt`` every that many steps (mid-epoch resume).
        log_samples: validation images drawn with their predictions sent to TensorBoard each validation (0: off).
        weights: full detector checkpoint to start from or evaluate (path, https URL or ``zoo:NAME``,
            e.g. ``zoo:mask_rcnn_focalnet_t_srf_1x``); replaces ``MODEL.WEIGHTS`` when given.
        monitor, monitor_mode: metric (and whether higher is better) of the default ``ModelCheckpoint``,
            used when the trainer has no ``ModelCheckpoint`` of its own; ``None``: ``val/AP`` (boxes).
    """

    def __init__(
        self,
        detectron2: dict[str, Any] | None = None,
        lr: float = 1e-4,
        backbone_lr: float | None = None,
        weight_decay: float = 0.05,
        weight_decay_all: bool = False,
        lr_decay_epochs: Sequence[int] = (),
        lr_decay_factor: float = 0.1,
        warmup_iters: int = 0,
        warmup_factor: float = 0.001,
        score_threshold: float = 0.5,
        predict_output_dir: str = "predictions",
        on_nonfinite_loss: NonFiniteAction = "raise",
        checkpoint_every_n_steps: int | None = None,
        log_samples: int = 4,
        weights: str | None = None,
        monitor: str | None = None,
        monitor_mode: Literal["max", "min"] = "max",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.loss_guard = NonFiniteLossGuard(on_nonfinite_loss)
        overrides = detectron2 or {}
        self.cfg: CfgNode = build_detectron2_cfg(overrides)
        if weights and self.cfg.MODEL.WEIGHTS and weights != self.cfg.MODEL.WEIGHTS:
            log.info("weights=%s replaces detectron2.MODEL.WEIGHTS=%s", weights, self.cfg.MODEL.WEIGHTS)
        self.weights_source: str = weights or self.cfg.MODEL.WEIGHTS
        self.meta_architecture: str = self.cfg.MODEL.META_ARCHITECTURE
        self.evaluate_masks = bool(self.cfg.MODEL.MASK_ON)
        if self.meta_architecture not in NUM_CLASSES_KEYS:
            raise ValueError(
                f"meta-architecture {self.meta_architecture!r} has no entry in focalnet_pl.d2.config.NUM_CLASSES_KEYS "
                f"(known: {sorted(NUM_CLASSES_KEYS)}); register the config key holding its number of classes"
            )
        self.num_classes_key = NUM_CLASSES_KEYS[self.meta_architecture]
        self.explicit_num_classes: int | None = (
            get_dotted(self.cfg, self.num_classes_key) if has_dotted(overrides, self.num_classes_key) else None
        )
        self.num_classes: int | None = None
        self.model: nn.Module | None = None
        if self.explicit_num_classes is not None:
            self._build_model(self.explicit_num_classes)
        self._evaluator: COCOInstanceEvaluator | None = None
        self._predictions: dict[int, tuple[dict, list[dict]]] = {}
        self._checkpoint_metadata: Metadata | None = None
        self.weights_report: DetectorLoadReport | None = None

    # ---- model --------------------------------------------------------------------------------
    def _build_model(self, num_classes: int) -> None:
        cfg = self.cfg.clone()
        cfg.defrost()
        node = get_dotted(cfg, self.num_classes_key.rsplit(".", 1)[0])
        node[self.num_classes_key.rsplit(".", 1)[1]] = int(num_classes)
        cfg.MODEL.DEVICE = "cpu"  # Lightning moves the module
        cfg.freeze()
        self.model = build_model(cfg)
        train_masks_where_annotated(self.model)  # objects annotated with a box only train no mask
        self.num_classes = int(num_classes)

    def _datamodule(self) -> Any:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def _data_num_classes(self) -> int | None:
        """Classes of the datamodule's annotated data (``None`` when it has none, e.g. a predict folder)."""
        try:
            return getattr(self._datamodule(), "num_classes", None)
        except ValueError:
            return None

    def setup(self, stage: str) -> None:
        data_classes = self._data_num_classes()
        if self.explicit_num_classes is not None and data_classes is not None and data_classes != self.explicit_num_classes:
            raise ValueError(
                f"the config sets {self.num_classes_key}={self.explicit_num_classes} but the datamodule has "
                f"{data_classes} classes"
            )
        if self.model is None and data_classes is not None:
            self._build_model(data_classes)
        elif self.model is not None and data_classes is not None and data_classes != self.num_classes:
            raise ValueError(f"the model predicts {self.num_classes} classes but the datamodule has {data_classes}")
        if self.weights_source and self.weights_report is None and self.model is not None:
            self._load_model_weights()
        data_hparams = getattr(self._datamodule(), "hparams", None)
        data_format = data_hparams.get("image_format") if isinstance(data_hparams, Mapping) else None
        if data_format is not None and data_format != self.cfg.INPUT.FORMAT:
            raise ValueError(
                f"the datamodule gives {data_format} images but detectron2.INPUT.FORMAT is {self.cfg.INPUT.FORMAT!r}"
            )

    def _load_model_weights(self) -> None:
        """``weights`` / ``MODEL.WEIGHTS``: a full detector checkpoint (official, detrex, mmdetection or ours),
        class rows chosen by the datamodule's category ids (see :func:`focalnet_pl.load_detector_weights`)."""
        metadata = self._data_metadata()
        class_ids = class_names = None
        if metadata is not None and metadata.get("thing_dataset_id_to_contiguous_id", None):
            to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
            class_ids = [to_dataset[i] for i in range(len(to_dataset))]
            class_names = list(metadata.get("thing_classes", None) or []) or None
        self.weights_report = load_detector_weights(
            self._require_model(), self.weights_source, class_ids=class_ids, class_names=class_names
        )

    def configure_model(self) -> None:
        """Shard with FSDP2 under ``FSDP2Strategy`` (no-op under other strategies, never twice)."""
        maybe_fully_shard(self, block_types=FSDP_BLOCK_TYPES)

    @property
    def monitor_metric(self) -> str:
        """The metric of the default ``ModelCheckpoint``: ``monitor``, else the task's own."""
        return self.hparams.monitor or "val/AP"

    def configure_callbacks(self) -> list:
        hp = self.hparams
        return default_task_callbacks(self.trainer, self.monitor_metric, hp.monitor_mode, hp.checkpoint_every_n_steps,
                                      hp.log_samples)

    def _require_model(self) -> nn.Module:
        """The detectron2 model; it is built once its number of classes is known: from the config,
        in ``setup`` from the datamodule, or when a checkpoint is restored."""
        if self.model is None:
            raise RuntimeError(
                f"number of classes unknown: set detectron2.{self.num_classes_key}, use a datamodule with "
                "annotated data (num_classes), or restore a checkpoint (ckpt_path)"
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
        metadata = self._data_metadata() or self._checkpoint_metadata
        return dino_onnx_spec(model, list(metadata.thing_classes) if metadata is not None else None, self.cfg.INPUT.FORMAT)

    # ---- checkpoints --------------------------------------------------------------------------
    def _data_metadata(self) -> Metadata | None:
        try:
            return self._datamodule().metadata
        except (AttributeError, ValueError):
            return None

    def architecture(self) -> dict[str, Any]:
        """What this task's checkpoints record of the model (see :mod:`focalnet_pl.architecture`)."""
        model = self._require_model()
        backbone = next((m for m in model.modules() if isinstance(m, FocalNetBackbone)), None)
        metadata = self._data_metadata() or self._checkpoint_metadata
        data = getattr(self._datamodule(), "hparams", None) or {}
        eval_size = [data["test_min_size"], data.get("test_max_size")] if "test_min_size" in data else None
        levels = {f"MODEL.{name}.NUM_FEATURE_LEVELS": node.NUM_FEATURE_LEVELS
                  for name, node in self.cfg.MODEL.items() if isinstance(node, CfgNode) and "NUM_FEATURE_LEVELS" in node}
        return {
            "task": "detection",
            "meta_architecture": self.meta_architecture,
            "focalnet": focalnet_settings(backbone.body.cfg, self.cfg.MODEL.FOCALNET.VARIANT) if backbone is not None else None,
            "out_features": list(backbone.output_shape()) if backbone is not None else None,
            "feature_levels": levels,
            "mask_on": bool(self.cfg.MODEL.MASK_ON),
            "num_classes": self.num_classes,
            "class_names": list(metadata.thing_classes) if metadata is not None else None,
            "input_format": self.cfg.INPUT.FORMAT,
            "eval_size": eval_size,
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        info: dict[str, Any] = {"meta_architecture": self.meta_architecture, "num_classes": self.num_classes}
        metadata = self._data_metadata() or self._checkpoint_metadata
        if metadata is not None:  # class names and ids, so that predict can label without the data
            info["thing_classes"] = list(metadata.thing_classes)
            info["thing_dataset_id_to_contiguous_id"] = dict(metadata.thing_dataset_id_to_contiguous_id)
        checkpoint["detection"] = info
        checkpoint[ARCHITECTURE_KEY] = self.architecture()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        require_task_checkpoint(checkpoint, "model.init_args.weights (MODEL.WEIGHTS)")
        info = checkpoint.get("detection")
        if not isinstance(info, dict):
            raise ValueError("not a DetectionTask checkpoint (no 'detection' entry)")
        if info["meta_architecture"] != self.meta_architecture:
            raise ValueError(
                f"checkpoint holds a {info['meta_architecture']} model but the config builds {self.meta_architecture}"
            )
        if "thing_classes" in info:
            self._checkpoint_metadata = Metadata(
                thing_classes=info["thing_classes"],
                thing_dataset_id_to_contiguous_id=info["thing_dataset_id_to_contiguous_id"],
            )
        if self.model is None:
            self._build_model(info["num_classes"])
        check_architecture(checkpoint.get(ARCHITECTURE_KEY), self.architecture())
        if info["num_classes"] != self.num_classes:
            raise ValueError(
                f"checkpoint model predicts {info['num_classes']} classes but this one predicts {self.num_classes}"
            )
        own = self.state_dict()
        theirs = checkpoint.get("state_dict", {})
        missing = sorted(set(own) - set(theirs))
        unexpected = sorted(set(theirs) - set(own))
        reshaped = sorted(k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape)
        if missing or unexpected or reshaped:
            raise ValueError(
                "checkpoint does not match the configured model (another head or backbone?): "
                f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
                f"{len(reshaped)} with other shapes {[(k, tuple(theirs[k].shape), tuple(own[k].shape)) for k in reshaped[:5]]}"
            )

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

    def _parameter_groups(self) -> list[dict]:
        """AdamW groups (see :func:`focalnet_pl.optim.param_groups`); the FocalNet / ResNet backbone
        gets ``backbone_lr``."""
        model = self._require_model()
        lr = self.hparams.lr
        backbone_lr = self.hparams.backbone_lr if self.hparams.backbone_lr is not None else lr
        prefixes = [f"{name}." for name, m in model.named_modules() if isinstance(m, (FocalNetBackbone, ResNet))]
        groups = self._group_parameters(model, {p: backbone_lr / lr for p in prefixes})
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
        return groups

    def _group_parameters(self, model: nn.Module, lr_scale: dict[str, float]) -> list[dict]:
        """Weight-decay groups of ``model`` with the given lr scales by name prefix."""
        return param_groups(model.named_parameters(), self.hparams.weight_decay, lr_scale,
                            decay_all=self.hparams.weight_decay_all)

    def lr_factor(self, step: int, epoch: int) -> float:
        """Multiplier of the base learning rates at optimizer ``step`` during ``epoch``."""
        decays = sum(epoch >= e for e in self.hparams.lr_decay_epochs)
        factor = self.hparams.lr_decay_factor**decays
        warmup = self.hparams.warmup_iters
        if step < warmup:
            alpha = step / warmup
            factor *= self.hparams.warmup_factor * (1 - alpha) + alpha
        return factor

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self._parameter_groups(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

        def factor(step: int) -> float:
            return self.lr_factor(step, self.trainer.current_epoch if self._trainer is not None else 0)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- evaluation ---------------------------------------------------------------------------
    def _split_metadata(self, split: str) -> Metadata:
        datamodule = self._datamodule()
        if datamodule is None or not hasattr(datamodule, "dataset_metadata"):
            raise ValueError("COCO evaluation needs a datamodule with dataset_metadata(split) (e.g. COCODataModule)")
        return datamodule.dataset_metadata(split)

    def _start_evaluation(self, split: str) -> None:
        metadata = self._split_metadata(split)
        to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
        self._evaluator = COCOInstanceEvaluator(
            metadata.json_file, to_dataset, ("bbox", "segm") if self.evaluate_masks else ("bbox",)
        )

    def _evaluation_step(self, batch: list[dict]) -> None:
        outputs = self._require_model()(batch)
        assert self._evaluator is not None
        self._evaluator.process(batch, outputs)

    def _output_dir(self) -> Path:
        trainer = self.trainer
        return Path(trainer.log_dir or trainer.default_root_dir)

    def _finish_evaluation(self, stage: str) -> dict[str, float]:
        assert self._evaluator is not None
        metrics = self._evaluator.evaluate(self._output_dir(), file_prefix=f"{stage}_")
        # identical on every rank (computed on rank 0 and broadcast): syncing averages equal values
        self.log_dict({f"{stage}/{name}": value for name, value in metrics.items()}, sync_dist=True)
        if self.trainer.is_global_zero:
            epoch = f" (epoch {self.current_epoch})" if stage == "val" else ""
            print(format_coco_table(metrics, title=f"COCO {stage}{epoch}:"), flush=True)
        self._evaluator = None
        return metrics

    def on_validation_epoch_start(self) -> None:
        if not self.trainer.sanity_checking:
            self._start_evaluation("val")

    def validation_step(self, batch: list[dict], batch_idx: int) -> None:
        if self.trainer.sanity_checking:
            self._require_model()(batch)
            return
        self._evaluation_step(batch)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_evaluation("val")

    def on_test_epoch_start(self) -> None:
        self._start_evaluation("test")

    def test_step(self, batch: list[dict], batch_idx: int) -> None:
        self._evaluation_step(batch)

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    # ---- prediction ---------------------------------------------------------------------------
    def _predict_metadata(self) -> Metadata:
        """Class names and ids: from the datamodule, else from the checkpoint, else ``class_<i>``."""
        metadata = self._data_metadata() or self._checkpoint_metadata
        if metadata is not None:
            return metadata
        classes = [f"class_{i}" for i in range(self.num_classes or 0)]
        return Metadata(thing_classes=classes, thing_dataset_id_to_contiguous_id={i: i for i in range(len(classes))})

    def on_predict_epoch_start(self) -> None:
        self._predictions = {}
        self._predict_meta = self._predict_metadata()
        Path(self.hparams.predict_output_dir).mkdir(parents=True, exist_ok=True)

    def predict_step(self, batch: list[dict], batch_idx: int) -> list[dict]:
        outputs = self._require_model()(batch)
        to_dataset = {v: k for k, v in self._predict_meta.thing_dataset_id_to_contiguous_id.items()}
        results = []
        for record, output in zip(batch, outputs):
            instances = output["instances"].to("cpu")
            image_rgb = read_image(record["file_name"], format="RGB")
            self._draw(record["file_name"], image_rgb, output)
            image_results = instances_to_coco_results(instances, record["image_id"], to_dataset, instances.has("pred_masks"))
            info = {"id": int(record["image_id"]), "file_name": str(record["file_name"]),
                    "height": int(record["height"]), "width": int(record["width"])}
            self._predictions[info["id"]] = (info, image_results)
            results.extend(image_results)
        return results

    def render_output(self, image_rgb: np.ndarray, output: dict, metadata: Metadata) -> np.ndarray:
        """The image with the model's output drawn on it (detectron2 ``Visualizer``; needs OpenCV)."""
        from detectron2.utils.visualizer import ColorMode, Visualizer

        instances = output["instances"].to("cpu")
        keep = instances[instances.scores >= self.hparams.score_threshold]
        return Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE).draw_instance_predictions(keep).get_image()

    def _draw(self, file_name: str, image_rgb: np.ndarray, output: dict) -> None:
        drawn = self.render_output(image_rgb, output, self._predict_meta)
        Image.fromarray(drawn).save(Path(self.hparams.predict_output_dir) / f"{Path(file_name).stem}.png")

    def visualize_batch(self, batch: list[dict], max_images: int) -> list[tuple[str, np.ndarray]]:
        """Validation images with the predictions drawn (for :class:`SamplePredictionLogger`)."""
        records = batch[:max_images]
        with torch.no_grad():
            outputs = self._require_model()(records)
        metadata = self._predict_metadata()
        return [(f"val_samples/{Path(r['file_name']).stem}",
                 self.render_output(read_image(r["file_name"], format="RGB"), o, metadata))
                for r, o in zip(records, outputs)]

    def on_predict_epoch_end(self) -> None:
        merged = gather_unique_by_key(self._predictions)
        if self.trainer.is_global_zero:
            out = Path(self.hparams.predict_output_dir)
            ids = sorted(merged)
            (out / "coco_results.json").write_text(json.dumps([r for i in ids for r in merged[i][1]]))
            images = [merged[i][0] for i in ids]
            categories = [
                {"id": dataset_id, "name": self._predict_meta.thing_classes[index]}
                for dataset_id, index in sorted(self._predict_meta.thing_dataset_id_to_contiguous_id.items())
            ]
            (out / "images.json").write_text(json.dumps({"images": images, "categories": categories}))
            print(f"predict: wrote {len(ids)} drawn images, coco_results.json and images.json to {out}", flush=True)
        self._predictions = {}


"""Image classification with a FocalNet: the paper's ImageNet recipe as a LightningModule."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy
from torchvision.transforms import v2

from focalnet_pl.architecture import ARCHITECTURE_KEY, check_architecture, focalnet_settings, require_task_checkpoint
from focalnet_pl.distributed import maybe_fully_shard
from focalnet_pl.ema import continue_from_trained_weights
from focalnet_pl.focalnet import FocalNet, FocalNetBlock, create_focalnet
from focalnet_pl.labels import class_names_from_file, imagenet_class_names
from focalnet_pl.optim import lr_factor, param_groups
from focalnet_pl.reliability import NonFiniteAction, NonFiniteLossGuard
from focalnet_pl.tasks.callbacks import default_task_callbacks
from focalnet_pl.tasks.data import ClassificationData, data_interface
from focalnet_pl.tasks.writers import TopKWriter
from focalnet_pl.visualize.draw import draw_top5, tensor_to_picture

if TYPE_CHECKING:
    from focalnet_pl.export import OnnxExportSpec

log = logging.getLogger(__name__)


class ClassificationTask(L.LightningModule):
    """FocalNet classifier trained with AdamW, warmup + per-step cosine, label smoothing, Mixup/CutMix.

    Args:
        variant: FocalNet variant name (``focalnet_pl.list_variants()``).
        num_classes: classes; ``None`` takes ``num_classes`` from the datamodule at setup.
        weights: pretrained checkpoint to start from: a path, https URL or ``zoo:NAME`` (fine-tuning:
            another class count gets a new head, an ImageNet-22K head the rows of the 1K classes;
            another resolution needs nothing — FocalNet has no position embeddings).
        model_overrides: FocalNetConfig fields, e.g. ``{drop_path_rate: 0.3}``; the variant's own
            drop path rate (the paper's per-variant value) is used otherwise.
        lr: peak learning rate for a total batch of ``lr_reference_batch`` (linear scaling rule:
            the actual peak is ``lr * total_batch / lr_reference_batch``; ``None`` disables scaling).
        warmup_epochs, warmup_lr, min_lr: schedule (per optimizer step).
        label_smoothing, mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: regularisation
            (``alpha = 0`` disables that one; both 0 disable mixing).
        ema_decay: keep an exponential moving average of the weights with this decay, validate, test,
            predict, checkpoint and export it (:class:`focalnet_pl.ema.ModelEMA`); ``None``: off.
        grad_checkpointing: activation checkpointing in every block.
        class_names: the name of each class, or a file with one per line; by default the
            datamodule's, else the ImageNet-1K/22K names for a 1000/21842-class head (from timm's
            bundled ImageNet info).
        predict_output_dir: where ``predict`` writes ``predictions.json`` (top-5 per image; default
            ``<trainer.default_root_dir>/predictions``) and, with
            ``predict_draw``, one picture per image with its top-5 labels (``images/``).
        on_nonfinite_loss: ``"raise"`` stops at a NaN/Inf loss naming the step; ``"skip"`` skips that step.
        checkpoint_every_n_steps: also refresh ``last.ckpt`` every that many steps (mid-epoch resume).
        log_samples: images drawn with their predictions sent to TensorBoard at each validation (0: off).
        monitor, monitor_mode: metric (and whether higher is better) of the default ``ModelCheckpoint``,
            used when the trainer has no ``ModelCheckpoint`` of its own.
    """

    def __init__(
        self,
        variant: str = "focalnet_tiny_srf",
        num_classes: int | None = None,
        weights: str | None = None,
        model_overrides: dict[str, Any] | None = None,
        lr: float = 5e-4,
        lr_reference_batch: int | None = 512,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        warmup_epochs: float = 20.0,
        warmup_lr: float = 5e-7,
        min_lr: float = 5e-6,
        label_smoothing: float = 0.1,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        ema_decay: float | None = None,
        grad_checkpointing: bool = False,
        class_names: list[str] | str | None = None,
        predict_output_dir: str | None = None,
        predict_draw: bool = True,
        on_nonfinite_loss: NonFiniteAction = "raise",
        checkpoint_every_n_steps: int | None = None,
        log_samples: int = 8,
        monitor: str = "val/acc1",
        monitor_mode: Literal["max", "min"] = "max",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model: FocalNet | None = None
        self.loss_guard = NonFiniteLossGuard(on_nonfinite_loss)
        self._names: list[str] | None = None  # class names for predict, read once per predict epoch
        if num_classes is not None:
            self._build(num_classes)

    def class_name_list(self) -> list[str] | None:
        """Names of the classes: ``class_names`` (a list or a file), else ImageNet's for its head size."""
        names = self.hparams.class_names
        if isinstance(names, str):
            return class_names_from_file(names)
        if names is None and self.hparams.num_classes is not None:
            return imagenet_class_names(int(self.hparams.num_classes))
        return list(names) if names is not None else None

    def architecture(self) -> dict[str, Any]:
        """What this task's checkpoints record of the model (see :mod:`focalnet_pl.architecture`)."""
        data = self._data()
        return {
            "task": "classification",
            "focalnet": focalnet_settings(self.model.cfg, self.hparams.variant) if self.model is not None else None,
            "num_classes": self.hparams.num_classes,
            "class_names": self.class_name_list(),
            "input_format": "RGB",
            "eval_size": data.image_size if data is not None else None,
        }

    # ----------------------------------------------------------------- model
    def _build(self, num_classes: int) -> None:
        hp = self.hparams
        self.model = create_focalnet(
            hp.variant, num_classes=num_classes, weights=hp.weights,
            grad_checkpointing=hp.grad_checkpointing, **(hp.model_overrides or {}),
        )
        k = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.train_acc.persistent(True)  # a mid-epoch resume continues the epoch's accuracy
        self.val_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.val_acc5 = MulticlassAccuracy(num_classes, top_k=k, average="micro")
        self.test_acc1 = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_acc5 = MulticlassAccuracy(num_classes, top_k=k, average="micro")
        self.mix = self._make_mix(num_classes)

    def configure_model(self) -> None:
        if self.model is None:
            data = self._data()
            if data is None:
                raise ValueError("ClassificationTask: set model.num_classes or use a datamodule that provides num_classes")
            self.hparams.num_classes = int(data.num_classes)
            if self.hparams.class_names is None and data.class_names:
                self.hparams.class_names = list(data.class_names)
            self._build(int(data.num_classes))
        maybe_fully_shard(self, block_types=[FocalNetBlock])  # FSDP2 strategies only; never twice

    def _make_mix(self, num_classes: int) -> v2.Transform | None:
        hp = self.hparams
        choices, probs = [], []
        if hp.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=hp.mixup_alpha, num_classes=num_classes))
            probs.append(1.0 - hp.mixup_switch_prob if hp.cutmix_alpha > 0 else 1.0)
        if hp.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=hp.cutmix_alpha, num_classes=num_classes))
            probs.append(hp.mixup_switch_prob if hp.mixup_alpha > 0 else 1.0)
        if not choices or hp.mixup_prob <= 0:
            return None
        mix = v2.RandomChoice(choices, p=probs)
        return v2.RandomApply([mix], p=hp.mixup_prob) if hp.mixup_prob < 1 else mix

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def onnx_export_spec(self) -> OnnxExportSpec:
        """``cli.py export --format onnx``: normalised RGB images ``(batch, 3, height, width)`` of any
        size -> ``logits (batch, classes)``."""
        from focalnet_pl.export import OnnxExportSpec

        names = self.hparams.class_names
        return OnnxExportSpec(
            module=self.model,
            example_inputs=(torch.randn(2, 3, 96, 128),),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes=({0: "batch", 2: "height", 3: "width"},),
            check_inputs=[(torch.randn(1, 3, 64, 80),), (torch.randn(3, 3, 45, 77),)],
            metadata={"class_names": json.dumps(names)} if names else {},
        )

    # -------------------------------------------------------------- training
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, labels = batch[0], batch[1]
        targets = labels
        if self.mix is not None:
            images, targets = self.mix(images, labels)
        logits = self.model(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        if self.loss_guard(loss, {"cross_entropy": loss}, step=self.global_step, epoch=self.current_epoch) is None:
            return None
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        if self.mix is None:
            self.train_acc(logits, labels)
            self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> None:
        images, labels = batch[0], batch[1]
        logits = self.model(images)
        loss = F.cross_entropy(logits, labels)
        acc1, acc5 = getattr(self, f"{stage}_acc1"), getattr(self, f"{stage}_acc5")
        acc1(logits, labels)
        acc5(logits, labels)
        bs = len(images)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=bs)
        self.log(f"{stage}/acc1", acc1, prog_bar=True, batch_size=bs)
        self.log(f"{stage}/acc5", acc5, batch_size=bs)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> list[dict]:
        images, paths = batch[0], batch[1]
        probs = self.model(images).softmax(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        names = self._names
        results = []
        for path, scores, indices in zip(paths, top.values.tolist(), top.indices.tolist()):
            labels = [names[i] if names else str(i) for i in indices]
            results.append({"file": str(path), "top5": [{"class_id": i, "label": lab, "score": round(s, 6)}
                                                         for i, lab, s in zip(indices, labels, scores)]})
        return results

    def visualize_batch(self, batch: Any, max_images: int) -> list[tuple[str, np.ndarray]]:
        """Validation images with their top-5 predictions and true label drawn (for :class:`SamplePredictionLogger`)."""
        images, labels = batch[0][:max_images], batch[1][:max_images]
        with torch.no_grad():
            probs = self.model(images).softmax(-1)
        top = probs.topk(min(5, probs.shape[-1]), dim=-1)
        names = self.class_name_list()
        data = self._data()
        if data is None:
            raise ValueError("ClassificationTask draws validation samples with the datamodule's mean/std: fit with "
                             "a datamodule, or set log_samples: 0")
        mean, std = data.mean, data.std
        pictures = []
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            top5 = [{"label": names[c] if names else str(c), "score": s}
                    for c, s in zip(top.indices[i].tolist(), top.values[i].tolist())]
            truth = names[label] if names else str(label)
            pictures.append((f"val_samples/{i}", np.asarray(draw_top5(tensor_to_picture(image, mean, std), top5, truth))))
        return pictures

    def on_predict_epoch_start(self) -> None:
        self._names = self.class_name_list()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[ARCHITECTURE_KEY] = self.architecture()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another architecture (naming every difference); checkpoints written
        before the training accuracy was persistent load with a fresh accumulator."""
        require_task_checkpoint(checkpoint, "model.init_args.weights")
        continue_from_trained_weights(self._trainer, checkpoint)
        if self.model is not None:
            check_architecture(checkpoint.get(ARCHITECTURE_KEY), self.architecture())
        state = checkpoint.get("state_dict")
        if self.model is not None and isinstance(state, dict):
            for key, value in self.train_acc.state_dict(prefix="train_acc.").items():
                state.setdefault(key, value)

    def _predict_dir(self) -> Path:
        """``predict_output_dir``, else ``<trainer.default_root_dir>/predictions``."""
        if self.hparams.predict_output_dir:
            return Path(self.hparams.predict_output_dir)
        return Path(self.trainer.default_root_dir) / "predictions"


    # ------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = param_groups(self.model.named_parameters(), hp.weight_decay)
        base_lr = hp.lr * self._total_batch_size() / hp.lr_reference_batch if hp.lr_reference_batch else hp.lr
        scale = base_lr / hp.lr
        warmup_lr, min_lr = hp.warmup_lr * scale, hp.min_lr * scale
        optimizer = torch.optim.AdamW(groups, lr=base_lr, betas=tuple(hp.betas), eps=hp.eps)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = int(round(hp.warmup_epochs * total / epochs))
        scheduler = LambdaLR(optimizer, lambda step: lr_factor(
            step, decay="cosine", total_steps=total, warmup_steps=warmup, warmup_factor=warmup_lr / base_lr,
            min_factor=min_lr / base_lr))
        log.info("AdamW peak lr %.3g, %d warmup of %d steps", base_lr, warmup, total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _total_batch_size(self) -> int:
        """Images per optimizer step over all devices (for the linear lr scaling)."""
        data = self._data()
        if data is None:
            raise ValueError("ClassificationTask scales the learning rate by the total batch (lr_reference_batch): "
                             "fit with a datamodule that has batch_size, or set lr_reference_batch: null")
        return int(data.batch_size) * self.trainer.world_size * self.trainer.accumulate_grad_batches

    def _data(self) -> ClassificationData | None:
        return data_interface(self._trainer, ClassificationData, type(self).__name__)

    def configure_callbacks(self) -> list[Callback]:
        hp = self.hparams
        callbacks = default_task_callbacks(self.trainer, hp.monitor, hp.monitor_mode, hp.checkpoint_every_n_steps,
                                           hp.log_samples, hp.ema_decay)
        if self.trainer.state.fn == "predict" and not any(isinstance(c, TopKWriter) for c in self.trainer.callbacks):
            callbacks.append(TopKWriter(str(self._predict_dir()), draw=hp.predict_draw))
        return callbacks


"""What the tasks read of their datamodule is declared (``focalnet_pl.tasks.data``): a datamodule lacking a
member is refused by name, and nothing falls back to a guessed value."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import TINY

from focalnet_pl.tasks import ClassificationTask
from focalnet_pl.tasks.detection import DetectionTask


class _ImagesOnly(L.LightningDataModule):
    """Serves tensors, declares none of the members a task reads."""

    batch_size = 2

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1]))
        return torch.utils.data.DataLoader(data, batch_size=self.batch_size)


def _trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False, enable_checkpointing=False, max_steps=1)


def test_a_datamodule_without_the_declared_members_is_refused_by_name(tmp_path: Path) -> None:
    task = ClassificationTask(num_classes=2, model_overrides=TINY, mixup_alpha=0, cutmix_alpha=0)
    with pytest.raises(TypeError, match=r"ClassificationTask reads .*ClassificationData.*_ImagesOnly has no "
                                        r"class_names, image_size, mean, num_classes, std"):
        _trainer(tmp_path).fit(task, datamodule=_ImagesOnly())
    detection = DetectionTask(detectron2={"MODEL": {"ROI_HEADS": {"NUM_CLASSES": 2}}})
    with pytest.raises(TypeError, match=r"DetectionTask reads .*DetectronData.*_ImagesOnly has no class_metadata, "
                                        r"dataset_metadata, eval_size, image_format, instance_ground_truth"):
        _trainer(tmp_path).fit(detection, datamodule=_ImagesOnly())


def test_the_learning_rate_is_not_scaled_by_a_guessed_batch_size(tmp_path: Path) -> None:
    """Without a datamodule the total batch is unknown: the scaled learning rate needs one (it used to take 1)."""
    task = ClassificationTask(num_classes=2, model_overrides=TINY, mixup_alpha=0, cutmix_alpha=0, log_samples=0)
    with pytest.raises(ValueError, match="scales the learning rate by the total batch .* lr_reference_batch: null"):
        _trainer(tmp_path).fit(task, train_dataloaders=_ImagesOnly().train_dataloader())
    unscaled = ClassificationTask(num_classes=2, model_overrides=TINY, mixup_alpha=0, cutmix_alpha=0, log_samples=0,
                                  lr_reference_batch=None, lr=1e-3, warmup_epochs=0)
    trainer = _trainer(tmp_path)
    trainer.fit(unscaled, train_dataloaders=_ImagesOnly().train_dataloader())
    assert trainer.global_step == 1 and trainer.optimizers[0].param_groups[0]["initial_lr"] == 1e-3

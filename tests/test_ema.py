"""EMA of the weights (focalnet_pl.ema.ModelEMA): formula, validation, checkpoints, resume, export, every task."""
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from datamodules import ImageNetDataModule
from focalnet_pl.distributed import FSDP2Strategy
from focalnet_pl.ema import EMA_STATE_KEY, TRAINED_STATE_KEY, ModelEMA
from focalnet_pl.export import export_weights, load_task
from focalnet_pl.tasks import ClassificationTask, DetectionTask, SegmentationTask
from helpers import TINY, write_imagefolder

TASK_ARGS = {"model_overrides": TINY, "lr": 3e-3, "lr_reference_batch": None, "warmup_epochs": 0,
             "mixup_alpha": 0.0, "cutmix_alpha": 0.0}


class WeightRecorder(Callback):
    """The trained weights at the start of fit and after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def _record(self, pl_module: L.LightningModule) -> None:
        self.states.append({k: v.detach().clone() for k, v in pl_module.model.state_dict().items()})

    def on_fit_start(self, trainer, pl_module) -> None:
        self._record(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._record(pl_module)


def _datamodule(root: Path) -> ImageNetDataModule:
    return ImageNetDataModule(root=str(root), image_size=32, batch_size=8, num_workers=0, pin_memory=False,
                              persistent_workers=False, randaugment_num_ops=0, color_jitter=0.0,
                              random_erasing_prob=0.0, train_crop_scale=(0.8, 1.0), eval_crop_ratio=1.0)


def _fit(root: Path, out: Path, max_epochs: int, callbacks: list[Callback], ckpt_path: str | None = None,
         **task_args) -> tuple[ClassificationTask, L.Trainer]:
    L.seed_everything(0)
    task = ClassificationTask(**(TASK_ARGS | task_args))
    checkpoints = ModelCheckpoint(dirpath=out, filename="epoch{epoch}", save_top_k=-1, auto_insert_metric_name=False)
    trainer = L.Trainer(default_root_dir=out, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, max_epochs=max_epochs, num_sanity_val_steps=0,
                        callbacks=[*callbacks, checkpoints])
    trainer.fit(task, datamodule=_datamodule(root), ckpt_path=ckpt_path)
    return task, trainer


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _model_part(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("ema") / "data", n_per_class=8)  # 2 steps per epoch


def test_ema_formula_validation_checkpoint_and_export(images: Path, tmp_path: Path) -> None:
    recorder = WeightRecorder()
    configured = ModelEMA(decay=0.8, warmup_power=1.0)  # takes the place of the task's ema_decay=0.5
    task, trainer = _fit(images, tmp_path / "run", 2, [configured, recorder], ema_decay=0.5)
    assert [c for c in trainer.callbacks if isinstance(c, ModelEMA)] == [configured]
    assert configured.updates == 4 and configured.decay_at(1) == pytest.approx(0.5)  # 1 - 2**-1
    assert [configured.decay_at(k) for k in (2, 3, 4)] == pytest.approx([2 / 3, 0.75, 0.8])

    # ema_0 = initial weights, ema_k = d_k ema_(k-1) + (1 - d_k) weights_k
    initial, *steps = recorder.states
    expected = dict(initial)
    for k, weights in enumerate(steps, start=1):
        d = configured.decay_at(k)
        expected = {n: d * expected[n] + (1 - d) * weights[n] if weights[n].is_floating_point() else weights[n]
                    for n in weights}
    final = {k: v.detach() for k, v in task.model.state_dict().items()}  # fit ends with the EMA weights
    torch.testing.assert_close(final, expected)
    assert not torch.allclose(final["head.weight"], steps[-1]["head.weight"])

    # the last validation ran on the EMA weights: the same loss as validating them now
    fit_loss = trainer.callback_metrics["val/loss"].item()
    assert trainer.validate(task, datamodule=_datamodule(images), verbose=False)[0]["val/loss"] == pytest.approx(fit_loss)
    checkpoint = _load(tmp_path / "run" / "epoch1.ckpt")
    torch.testing.assert_close(_model_part(checkpoint["state_dict"]), expected)
    torch.testing.assert_close(_model_part(checkpoint[TRAINED_STATE_KEY]), steps[-1], rtol=0, atol=0)
    assert checkpoint[EMA_STATE_KEY] == {"updates": 4, "updated_at_step": 4}
    trained = ClassificationTask(**(TASK_ARGS | {"num_classes": 2}))
    trained.load_state_dict(checkpoint[TRAINED_STATE_KEY])
    raw_loss = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).validate(
        trained, datamodule=_datamodule(images), verbose=False)[0]["val/loss"]
    assert raw_loss != pytest.approx(fit_loss)

    # exports (and test / predict, which load state_dict) get the EMA weights
    config = {"model": {"class_path": "focalnet_pl.tasks.ClassificationTask", "init_args": TASK_ARGS}}
    exported = tmp_path / "model.safetensors"
    export_weights(load_task(config, tmp_path / "run" / "epoch1.ckpt"), exported, part="model")
    from safetensors.torch import load_file

    torch.testing.assert_close(_model_part(load_file(str(exported))), expected)


def test_resume_restores_the_average_exactly(images: Path, tmp_path: Path) -> None:
    """Fit 2 epochs, or 1 and then resume to 2: the same EMA and trained weights, bit for bit
    (a constant learning rate: the schedule's length depends on max_epochs)."""
    constant = {"ema_decay": 0.7, "min_lr": TASK_ARGS["lr"]}
    whole, _ = _fit(images, tmp_path / "whole", 2, [], **constant)
    _fit(images, tmp_path / "first", 1, [], **constant)
    resumed, _ = _fit(images, tmp_path / "first", 2, [], ckpt_path=str(tmp_path / "first" / "epoch0.ckpt"), **constant)
    torch.testing.assert_close(resumed.model.state_dict(), whole.model.state_dict(), rtol=0, atol=0)  # EMA weights
    for name in (TRAINED_STATE_KEY, "state_dict"):
        torch.testing.assert_close(_model_part(_load(tmp_path / "first" / "epoch1.ckpt")[name]),
                                   _model_part(_load(tmp_path / "whole" / "epoch1.ckpt")[name]), rtol=0, atol=0)

    # resumed with EMA off: training continues from the trained weights, not from the average
    without_ema, _ = _fit(images, tmp_path / "off", 1, [], ckpt_path=str(tmp_path / "first" / "epoch0.ckpt"),
                          min_lr=TASK_ARGS["lr"])
    torch.testing.assert_close(without_ema.model.state_dict(),
                               _model_part(_load(tmp_path / "first" / "epoch0.ckpt")[TRAINED_STATE_KEY]), rtol=0, atol=0)


class _Tied(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = self.first  # one tensor under two state_dict keys
        self.norm = nn.BatchNorm1d(3)  # float running stats and an integer counter


def test_tied_weights_and_integer_buffers_in_checkpoints() -> None:
    module = _Tied()
    ema = ModelEMA(decay=0.5)
    trainer = SimpleNamespace(global_step=0, state=SimpleNamespace(fn=TrainerFn.FITTING))
    ema.on_fit_start(trainer, module)
    start = module.first.weight.detach().clone()
    with torch.no_grad():
        module.first.weight.add_(1.0)
        module.norm.num_batches_tracked.fill_(3)
    trainer.global_step = 1
    ema.on_train_batch_end(trainer, module, None, None, 0)
    checkpoint = {"state_dict": module.state_dict()}
    ema.on_save_checkpoint(trainer, module, checkpoint)
    for key in ("first.weight", "second.weight"):
        torch.testing.assert_close(checkpoint["state_dict"][key], start + 0.5)
        torch.testing.assert_close(checkpoint[TRAINED_STATE_KEY][key], start + 1.0)
    assert checkpoint["state_dict"]["norm.num_batches_tracked"].item() == 3

    ema.on_validation_epoch_start(trainer, module)  # validation swaps the EMA in, and back
    torch.testing.assert_close(module.second.weight.detach(), start + 0.5)
    ema.on_validation_end(trainer, module)
    torch.testing.assert_close(module.second.weight.detach(), start + 1.0)


def test_every_task_switches_ema_on_with_ema_decay() -> None:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False)
    detectron2 = {"MODEL": {"META_ARCHITECTURE": "DINO"}}  # no class count: no model built here
    mask2former = {"MODEL": {"META_ARCHITECTURE": "Mask2Former"}}
    for task in (ClassificationTask(ema_decay=0.999), DetectionTask(detectron2=detectron2, ema_decay=0.999),
                 SegmentationTask(detectron2=mask2former, ema_decay=0.999)):
        task.trainer = trainer
        added = [c for c in task.configure_callbacks() if isinstance(c, ModelEMA)]
        assert len(added) == 1 and added[0].decay == 0.999
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(decay=1.0)
    sharded = SimpleNamespace(strategy=FSDP2Strategy())
    with pytest.raises(ValueError, match="sharded parameters"):
        ModelEMA().setup(sharded, ClassificationTask(), "fit")


def test_dino_fit_test_and_resume_with_ema_through_the_cli(small_coco: Path, small_cli_config, tmp_path: Path,
                                                          one_thread) -> None:
    """A detector (bf16-mixed DINO config, tiny widths): checkpoints hold the EMA and the trained weights,
    ``test`` and a resumed ``fit`` read them."""
    from focalnet_pl.cli import main

    config = small_cli_config("dino_focalnet_t", small_coco, {
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0, "WEIGHTS": ""},
        "DINO": {"HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2, "DIM_FEEDFORWARD": 64,
                 "NUM_QUERIES": 30, "DN_NUMBER": 10, "NUM_SELECT": 20},
    })
    config = config.rename(tmp_path / "dino.yaml")  # the run saves its own config.yaml in tmp_path
    main(["fit", "--config", str(config), "--model.init_args.ema_decay", "0.5"])
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = _load(last)
    assert state[EMA_STATE_KEY]["updates"] == state["global_step"] == 2
    assert any(not torch.equal(value, state[TRAINED_STATE_KEY][key]) for key, value in state["state_dict"].items())
    main(["test", "--config", str(config), "--ckpt_path", str(last)])
    main(["fit", "--config", str(config), "--model.init_args.ema_decay", "0.5", "--ckpt_path", str(last),
          "--trainer.max_epochs", "2"])
    resumed = _load(last)
    assert resumed["global_step"] > 2 and resumed[EMA_STATE_KEY]["updates"] == resumed["global_step"]

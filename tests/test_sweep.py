"""YAML sweeps: a 4-trial grid over the demo config runs, ranks, resumes; bad keys fail early; SLURM scripts."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import focalnet_pl.sweep as sweep_module
from focalnet_pl.sweep import Sweep, SweepConfigError, run_sweep

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs/demo/classification_shapes.yaml"


def _tiny_data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls, level in (("dark", 60), ("bright", 190)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(4):
                Image.fromarray(np.clip(rng.normal(level, 40, (32, 32, 3)), 0, 255).astype(np.uint8)).save(
                    folder / f"{i}.png")
    return root


@pytest.fixture
def tiny_demo(tmp_path: Path) -> Path:
    """Second base config: the demo task shrunk to 16 wide / 32 px on a 16-image ImageFolder, 1 epoch."""
    data = _tiny_data(tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "trainer": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2, "logger": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0},
        "model": {"init_args": {"model_overrides": {"embed_dim": 16, "depths": [1, 1, 1, 1], "drop_path_rate": 0.0},
                                "log_samples": 0}},
        "data": {"class_path": "datamodules.ImageNetDataModule",
                 "init_args": {"root": str(data), "image_size": 32, "batch_size": 4, "num_workers": 0,
                               "persistent_workers": False}},
    }))
    return path


def _write_sweep(tmp_path: Path, tiny: Path, **changes) -> Path:
    spec = {"base_configs": [str(DEMO_CONFIG), str(tiny)],
            "grid": {"model.init_args.lr": [1.0e-4, 3.0e-3], "model.init_args.label_smoothing": [0.0, 0.2]},
            "metric": "val/loss", "mode": "min", "output_dir": str(tmp_path / "sweep"), "launcher": "inprocess"}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec | changes))
    return path


def test_four_trial_sweep_runs_ranks_and_resumes(tmp_path, tiny_demo, monkeypatch):
    path = _write_sweep(tmp_path, tiny_demo)
    ranked = run_sweep(path)
    out = tmp_path / "sweep"
    assert [r["status"] for r in ranked] == ["ok"] * 4
    values = [r["value"] for r in ranked]
    assert values == sorted(values) and len(set(values)) == 4  # min mode: best (lowest val/loss) first
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    for row in ranked:
        result = json.loads((out / row["trial"] / "results.json").read_text())
        assert result["value"] == row["value"] and result["global_step"] == 2
        assert result["value"] == pytest.approx(result["final_metrics"]["val/loss"])

    with (out / "results.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [r["trial"] for r in table] == [r["trial"] for r in ranked]
    assert float(table[0]["val/loss"]) == values[0]
    assert {"model.init_args.lr", "model.init_args.label_smoothing"} <= set(table[0])
    markdown = (out / "results.md").read_text()
    assert markdown.index(ranked[0]["trial"]) < markdown.index(ranked[-1]["trial"])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["init_args"]["lr"] == ranked[0]["model.init_args.lr"]
    assert best["model"]["init_args"]["label_smoothing"] == ranked[0]["model.init_args.label_smoothing"]
    assert best["data"]["init_args"]["image_size"] == 32 and best["trainer"]["max_epochs"] == 1

    def must_not_run(directory):
        raise AssertionError(f"finished trial {directory} ran again")

    monkeypatch.setattr(sweep_module, "run_trial", must_not_run)
    assert [r["value"] for r in run_sweep(path)] == values


def test_unknown_override_key_fails_before_any_trial(tmp_path, tiny_demo):
    path = _write_sweep(tmp_path, tiny_demo, trials=[{"model.init_args.learning_rate": 0.1}])
    with pytest.raises(SweepConfigError, match=r"trial 4 .*learning_rate"):
        run_sweep(path)
    assert not (tmp_path / "sweep").exists()
    bad_file = _write_sweep(tmp_path, tiny_demo, metrics="val/acc1")
    with pytest.raises(SweepConfigError, match="unknown key.*metrics"):
        run_sweep(bad_file)


def test_slurm_mode_writes_one_sbatch_script_per_trial(tmp_path, tiny_demo):
    slurm = {"nodes": 2, "gpus_per_node": 4, "time": "12:00:00", "partition": "gpu", "account": "vision",
             "setup": ["source .venv/bin/activate"], "submit": False}
    path = _write_sweep(tmp_path, tiny_demo, launcher="slurm", slurm=slurm)
    sweep = Sweep.from_yaml(path)
    ranked = run_sweep(path)
    assert [r["status"] for r in ranked] == ["pending"] * 4
    for trial in sweep.expand():
        script = (trial.directory / "job.sbatch").read_text()
        assert script.startswith("#!/bin/bash\n")
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --time=12:00:00", "#SBATCH --partition=gpu", "#SBATCH --account=vision",
                     "source .venv/bin/activate",
                     f"srun python -m focalnet_pl.sweep --run-trial {trial.directory.resolve()}"):
            assert line in script.splitlines(), line
        args = json.loads((trial.directory / "trial.json").read_text())["args"]
        assert "--trainer.num_nodes=2" in args and "--trainer.devices=4" in args
        assert f"--trainer.default_root_dir={trial.directory}" in args
        assert not (trial.directory / "results.json").exists()

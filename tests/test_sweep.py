"""YAML sweeps on Optuna: a 4-trial grid runs, ranks and resumes (failed trials again); TPE; pruning in a local
submitit job; bad keys fail early; SLURM submissions through submitit."""
from __future__ import annotations

import csv
import json
import os
import pickle
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from PIL import Image

import focalnet_pl.sweep as sweep_module
from focalnet_pl.sweep import SweepConfigError, run_job, run_sweep

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


@pytest.mark.slow
def test_four_trial_sweep_runs_ranks_and_resumes(tmp_path, tiny_demo, monkeypatch):
    path = _write_sweep(tmp_path, tiny_demo)
    train = sweep_module.train_trial

    def fails_once(command, args, metric, callbacks):
        if "--model.init_args.lr=0.003" in args and "--model.init_args.label_smoothing=0.2" in args:
            raise RuntimeError("out of memory (simulated)")
        return train(command, args, metric, callbacks)

    monkeypatch.setattr(sweep_module, "train_trial", fails_once)
    first = run_sweep(path)
    assert sorted(r["status"] for r in first) == ["failed", "ok", "ok", "ok"]
    assert first[-1]["status"] == "failed" and first[-1]["rank"] is None

    ran = []
    monkeypatch.setattr(sweep_module, "train_trial", lambda *a: ran.append(a) or train(*a))
    ranked = [r for r in run_sweep(path) if r["status"] != "failed"]  # the failed trial ran again
    assert len(ran) == 1 and "--model.init_args.lr=0.003" in ran[0][1]
    out = tmp_path / "sweep"
    assert [r["status"] for r in ranked] == ["ok"] * 4
    values = [r["value"] for r in ranked]
    assert values == sorted(values) and len(set(values)) == 4  # min mode: best (lowest val/loss) first
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]
    for row in ranked:
        result = json.loads((out / row["trial"] / "results.json").read_text())
        assert result["value"] == row["value"] and result["global_step"] == 2
        assert result["value"] == pytest.approx(result["final_metrics"]["val/loss"])
    grid = {(r["model.init_args.lr"], r["model.init_args.label_smoothing"]) for r in ranked}
    assert grid == {(lr, ls) for lr in (1.0e-4, 3.0e-3) for ls in (0.0, 0.2)}

    with (out / "results.csv").open() as handle:
        table = [row for row in csv.DictReader(handle) if row["status"] == "ok"]
    assert [r["trial"] for r in table] == [r["trial"] for r in ranked]
    assert float(table[0]["val/loss"]) == values[0]
    assert {"model.init_args.lr", "model.init_args.label_smoothing"} <= set(table[0])
    markdown = (out / "results.md").read_text()
    assert markdown.index(ranked[0]["trial"]) < markdown.index(ranked[-1]["trial"])
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["model"]["init_args"]["lr"] == ranked[0]["model.init_args.lr"]
    assert best["model"]["init_args"]["label_smoothing"] == ranked[0]["model.init_args.label_smoothing"]
    assert best["data"]["init_args"]["image_size"] == 32 and best["trainer"]["max_epochs"] == 1

    # the study lives in SQLite next to the results: another machine can load (and work on) it
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert study.best_value == values[0] and len(study.trials) == 5

    def must_not_run(*args):
        raise AssertionError(f"finished trial {args} ran again")

    monkeypatch.setattr(sweep_module, "train_trial", must_not_run)
    assert [r["value"] for r in run_sweep(path) if r["status"] == "ok"] == values


@pytest.mark.slow
def test_tpe_search_space_samples_within_bounds(tmp_path, tiny_demo):
    path = _write_sweep(tmp_path, tiny_demo, grid=None, n_trials=1,
                        search_space={"model.init_args.lr": {"low": 1.0e-4, "high": 1.0e-2, "log": True},
                                      "model.init_args.label_smoothing": [0.0, 0.1]})
    (row,) = run_sweep(path)
    assert row["status"] == "ok" and row["rank"] == 1
    assert 1.0e-4 <= row["model.init_args.lr"] <= 1.0e-2 and row["model.init_args.label_smoothing"] in (0.0, 0.1)
    trial_config = yaml.safe_load((tmp_path / "sweep" / row["trial"] / "trial_config.yaml").read_text())
    assert trial_config["model"]["init_args"]["lr"] == row["model.init_args.lr"]
    assert run_sweep(path) == [row]  # n_trials reached: nothing more runs


@pytest.mark.slow
def test_local_job_reports_to_the_study_and_is_pruned(tmp_path, tiny_demo):
    """``launcher: local`` runs the trial in a submitit job (the function SLURM jobs run); the pruner stops it
    at its first validation (threshold: val/loss above 0), one epoch of two."""
    path = _write_sweep(tmp_path, tiny_demo, grid={"model.init_args.lr": [1.0e-3]}, launcher="local",
                        fixed={"trainer.max_epochs": 2}, pruner={"type": "threshold", "upper": 0.0})
    (row,) = run_sweep(path)
    assert row["status"] == "pruned"
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{tmp_path / 'sweep' / 'study.db'}")
    (trial,) = study.trials
    assert list(trial.intermediate_values) == [2]  # reported once, after epoch 0 (2 steps); epoch 1 never ran
    assert trial.user_attrs["job_id"] and (tmp_path / "sweep" / "jobs").is_dir()


def test_unknown_override_key_fails_before_any_trial(tmp_path, tiny_demo):
    path = _write_sweep(tmp_path, tiny_demo, trials=[{"model.init_args.learning_rate": 0.1}])
    with pytest.raises(SweepConfigError, match=r"trial 4 .*learning_rate"):
        run_sweep(path)
    assert not (tmp_path / "sweep").exists()
    bad_file = _write_sweep(tmp_path, tiny_demo, metrics="val/acc1")
    with pytest.raises(SweepConfigError, match="unknown key.*metrics"):
        run_sweep(bad_file)
    bad_space = _write_sweep(tmp_path, tiny_demo, grid=None, n_trials=2, search_space={"model.init_args.lr": 0.1})
    with pytest.raises(SweepConfigError, match=r"search_space.model.init_args.lr must be"):
        run_sweep(bad_space)
    bad_pruner = _write_sweep(tmp_path, tiny_demo, pruner={"type": "median", "n_startup": 3})
    with pytest.raises(SweepConfigError, match=r"sweep.yaml: pruner .*n_startup"):
        run_sweep(bad_pruner)


def test_slurm_mode_submits_one_submitit_job_per_trial(tmp_path, tiny_demo, monkeypatch):
    """Without SLURM: a stand-in ``sbatch`` keeps what submitit submits; a rerun submits nothing more while
    those jobs have not started (here ``sacct`` is missing, so their state is unknown)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sbatch = bin_dir / "sbatch"
    sbatch.write_text('#!/bin/sh\nn=$(ls "$0".* 2>/dev/null | wc -l)\ncp "$1" "$0.$n"\necho "Submitted batch job 4$n"\n')
    sbatch.chmod(0o755)
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for it; never called here
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    slurm = {"nodes": 2, "gpus_per_node": 4, "time": "12:00:00", "partition": "gpu", "account": "vision",
             "setup": ["source .venv/bin/activate"], "additional_parameters": {"exclusive": True}}
    path = _write_sweep(tmp_path, tiny_demo, launcher="slurm", slurm=slurm)
    assert run_sweep(path) == []  # submitted; no trial has started
    scripts = sorted(bin_dir.glob("sbatch.*"))
    assert len(scripts) == 4
    for script in scripts:
        lines = script.read_text().splitlines()
        assert lines[0] == "#!/bin/bash"
        for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                     "#SBATCH --time=720", "#SBATCH --partition=gpu", "#SBATCH --account=vision",
                     "#SBATCH --exclusive", "source .venv/bin/activate"):
            assert line in lines, line
        assert any(line.startswith("srun ") and "-m submitit.core._submit" in line for line in lines)
    jobs = tmp_path / "sweep" / "jobs"
    submission = pickle.loads((jobs / "40_submitted.pkl").read_bytes())
    assert submission.function is run_job and submission.args == (str(path.resolve()), os.getcwd())
    assert json.loads((jobs / "submitted.json").read_text()) == ["40", "41", "42", "43"]
    assert run_sweep(path) == [] and len(list(bin_dir.glob("sbatch.*"))) == 4  # nothing submitted twice
    args = sweep_module.Sweep.from_yaml(path).trial_args({}, tmp_path)
    assert "--trainer.num_nodes=2" in args and "--trainer.devices=4" in args

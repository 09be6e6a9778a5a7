"""Hyper-parameter sweeps from YAML on Optuna (and submitit for SLURM): ``python cli.py sweep --config FILE``.

A sweep file names the base config(s), what to try (dotted CLI keys such as ``model.init_args.lr``),
the metric and its direction::

    base_configs: [configs/demo/classification_shapes.yaml]
    fixed: {trainer.max_epochs: 2}            # every trial
    grid: {model.init_args.lr: [1.0e-3, 3.0e-3], model.init_args.weight_decay: [0.0, 0.05]}
    trials: [{model.init_args.lr: 1.0e-2}]    # explicit points, run as given
    # or, for Optuna's TPE sampler instead of the grid:
    # search_space: {model.init_args.lr: {low: 1.0e-4, high: 1.0e-2, log: true}, model.init_args.mixup_alpha: [0.0, 0.8]}
    # n_trials: 20
    metric: val/acc1
    mode: max
    pruner: median                           # none, median, percentile, hyperband, threshold; or {type: ..., <args>}
    output_dir: runs/sweeps/demo_grid
    storage: sqlite:///runs/sweeps/demo_grid/study.db   # the default; any Optuna RDB URL (several machines share it)
    launcher: local                          # local (one process per trial), inprocess, or slurm
    slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00", partition: gpu}

``grid`` runs Optuna's ``GridSampler`` (every combination), ``search_space`` its ``TPESampler``
(``n_trials`` trials); ``trials`` are enqueued as given. Every trial's arguments (for a search space:
each key at a representative value) go through the CLI parser before anything runs, so a key the CLI
does not know stops the sweep at once. Trials report ``metric`` after each validation and the pruner
may stop them early. Each trial trains in ``<output_dir>/<NNN>-<overrides>``; the study (SQLite by
default) records them, so a rerun runs only what is left (failed trials again) and several machines
can work on one study. ``launcher: local`` runs each trial as a submitit local job, ``slurm`` submits
one submitit SLURM job per trial (``nodes`` x ``gpus_per_node`` processes started by ``srun``) and
returns; rerun later to collect. Results go to ``results.csv`` and ``results.md`` (best first) and the
best trial's full config to ``best.yaml``. A trial's score is the best value of ``metric`` kept by a
``ModelCheckpoint`` monitoring it, or else the value logged last.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import os
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
import yaml
from lightning.pytorch.callbacks import Callback

from focalnet_pl.io import atomic_write

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TRIAL_FILE = "trial.json"
TRIAL_CONFIG_FILE = "trial_config.yaml"
JOBS_FOLDER = "jobs"
SUBMITTED_FILE = "submitted.json"
SWEEP_KEYS = {"base_configs", "base_config", "command", "fixed", "grid", "trials", "search_space", "n_trials", "sampler",
              "seed", "metric", "mode", "pruner", "output_dir", "storage", "launcher", "slurm", "name"}
SLURM_KEYS = {"nodes", "gpus_per_node", "cpus_per_task", "mem", "time", "partition", "account", "qos", "setup",
              "additional_parameters", "python"}
PRUNERS = {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
           "percentile": optuna.pruners.PercentilePruner, "hyperband": optuna.pruners.HyperbandPruner,
           "threshold": optuna.pruners.ThresholdPruner}
STATUS = {"COMPLETE": "ok", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
ACTIVE = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)


class SweepConfigError(ValueError):
    """The sweep file or one of its trials is invalid (the message names the file, trial and key)."""


def _encode(value: Any) -> Any:
    """A value as Optuna stores categorical choices (None, bool, int, float, str): others as JSON."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    source: Path
    name: str
    base_configs: list[Path]
    metric: str
    mode: Literal["max", "min"]
    output_dir: Path
    storage: str
    command: str = "fit"
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    search_space: dict[str, Any] = field(default_factory=dict)
    n_trials: int | None = None
    sampler: Literal["grid", "tpe"] = "grid"
    seed: int = 0
    pruner: dict[str, Any] = field(default_factory=lambda: {"type": "median"})
    launcher: Literal["local", "inprocess", "slurm"] = "local"
    slurm: dict[str, Any] = field(default_factory=dict)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_yaml(cls, path: str | Path) -> Sweep:
        path = Path(path)
        if not path.is_file():
            raise SweepConfigError(f"sweep file {path} does not exist")
        spec = yaml.safe_load(path.read_text()) or {}
        if not isinstance(spec, dict):
            raise SweepConfigError(f"{path}: expected a mapping at the top level, got {type(spec).__name__}")
        unknown = sorted(set(spec) - SWEEP_KEYS)
        if unknown:
            raise SweepConfigError(f"{path}: unknown key(s) {unknown}; allowed: {sorted(SWEEP_KEYS)}")
        bases = spec.get("base_configs", spec.get("base_config"))
        bases = [bases] if isinstance(bases, str) else bases
        if not bases:
            raise SweepConfigError(f"{path}: 'base_configs' must name at least one config file")
        missing = [str(b) for b in bases if not Path(b).is_file()]
        if missing:
            raise SweepConfigError(f"{path}: base config file(s) not found: {missing}")
        if not spec.get("metric"):
            raise SweepConfigError(f"{path}: 'metric' (e.g. val/acc1) is required")
        if spec.get("mode", "max") not in ("max", "min"):
            raise SweepConfigError(f"{path}: mode={spec['mode']!r}; use 'max' or 'min'")
        if spec.get("launcher", "local") not in ("local", "inprocess", "slurm"):
            raise SweepConfigError(f"{path}: launcher={spec['launcher']!r}; use 'local', 'inprocess' or 'slurm'")
        grid = spec.get("grid") or {}
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise SweepConfigError(f"{path}: 'grid' must map dotted keys to non-empty lists of values")
        trials = spec.get("trials") or []
        if not isinstance(trials, list) or any(not isinstance(t, dict) for t in trials):
            raise SweepConfigError(f"{path}: 'trials' must be a list of mappings of dotted keys to values")
        fixed = spec.get("fixed") or {}
        if not isinstance(fixed, dict):
            raise SweepConfigError(f"{path}: 'fixed' must map dotted keys to values")
        search_space = spec.get("search_space") or {}
        for key, space in search_space.items():
            if not (isinstance(space, list) and space) and not (
                    isinstance(space, dict) and {"low", "high"} <= set(space) <= {"low", "high", "log", "step"}
                    and not (space.get("log") and "step" in space)):
                raise SweepConfigError(f"{path}: search_space.{key} must be a non-empty list of choices or "
                                       f"{{low, high[, log or step]}}, got {space!r}")
        sampler = spec.get("sampler", "tpe" if search_space else "grid")
        if sampler not in ("grid", "tpe"):
            raise SweepConfigError(f"{path}: sampler={sampler!r}; use 'grid' or 'tpe'")
        if sampler == "grid" and search_space:
            raise SweepConfigError(f"{path}: 'search_space' needs sampler: tpe (the grid sampler runs 'grid')")
        if sampler == "tpe" and (not search_space or not spec.get("n_trials")):
            raise SweepConfigError(f"{path}: sampler: tpe needs a 'search_space' and 'n_trials'")
        if sampler == "grid" and not grid and not trials:
            raise SweepConfigError(f"{path}: neither 'grid' nor 'trials' defines a trial")
        pruner = spec.get("pruner", "median")
        pruner = {"type": pruner} if isinstance(pruner, str) else dict(pruner)
        if pruner.get("type") not in PRUNERS:
            raise SweepConfigError(f"{path}: pruner type {pruner.get('type')!r}; use one of {sorted(PRUNERS)}")
        try:
            make_pruner(pruner)
        except (TypeError, ValueError) as err:
            raise SweepConfigError(f"{path}: pruner {pruner}: {err}") from err
        slurm = spec.get("slurm") or {}
        bad_slurm = sorted(set(slurm) - SLURM_KEYS)
        if bad_slurm:
            raise SweepConfigError(f"{path}: unknown slurm key(s) {bad_slurm}; allowed: {sorted(SLURM_KEYS)}")
        name = spec.get("name") or path.stem
        output_dir = Path(spec.get("output_dir") or Path("runs") / "sweeps" / name)
        storage = spec.get("storage") or f"sqlite:///{output_dir.resolve() / 'study.db'}"
        return cls(source=path, name=name, base_configs=[Path(b) for b in bases], metric=str(spec["metric"]),
                   mode=spec.get("mode", "max"), output_dir=output_dir, storage=storage,
                   command=spec.get("command", "fit"), fixed=fixed, grid=grid, trials=trials,
                   search_space=search_space, n_trials=spec.get("n_trials"), sampler=sampler, seed=spec.get("seed", 0),
                   pruner=pruner, launcher=spec.get("launcher", "local"), slurm=slurm)

    # ----------------------------------------------------------------- points
    def points(self) -> list[dict[str, Any]]:
        """The points checked before the sweep starts: the grid (cartesian product, in file order), the
        listed trials, and for a search space one point with each key at a representative value."""
        points = self.grid_points() + [dict(t) for t in self.trials]
        if self.search_space:
            points.append({key: space[0] if isinstance(space, list) else space["low"]
                           for key, space in self.search_space.items()})
        return points

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid, in file order."""
        keys = list(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*self.grid.values())] if keys else []

    def categories(self) -> dict[str, list[Any]]:
        """The values of every categorical key: its grid values, listed values and search-space choices
        (Optuna needs one distribution per name across the study)."""
        values: dict[str, list[Any]] = {}
        lists = [(key, space) for key, space in self.search_space.items() if isinstance(space, list)]
        for key, options in [*self.grid.items(), *lists]:
            values.setdefault(key, []).extend(options)
        for trial in self.trials:
            for key, value in trial.items():
                if not isinstance(self.search_space.get(key), dict):
                    values.setdefault(key, []).append(value)
        return values

    def suggest(self, trial: optuna.Trial, keys: list[str]) -> dict[str, Any]:
        """The overrides of ``trial`` for ``keys`` (categorical values decoded from Optuna's representation)."""
        categories, overrides = self.categories(), {}
        for key in keys:
            space = self.search_space.get(key)
            if isinstance(space, dict):
                integer = all(isinstance(space.get(k, 1), int) for k in ("low", "high", "step"))
                suggest = trial.suggest_int if integer else trial.suggest_float
                overrides[key] = suggest(key, space["low"], space["high"], log=space.get("log", False),
                                         step=space.get("step", 1 if integer else None))
                continue
            encoded = trial.suggest_categorical(key, _choices(categories[key]))
            overrides[key] = next(v for v in categories[key] if _encode(v) == encoded)
        return overrides

    def trial_args(self, overrides: dict[str, Any], directory: Path) -> list[str]:
        """CLI arguments (without the subcommand): base configs, fixed and trial overrides."""
        args: list[str] = []
        for base in self.base_configs:
            args += ["--config", str(base)]
        values = dict(self.fixed) | dict(overrides) | {"trainer.default_root_dir": str(directory)}
        if self.launcher == "slurm":
            values |= {"trainer.num_nodes": self.slurm.get("nodes", 1),
                       "trainer.devices": self.slurm.get("gpus_per_node", 1)}
        return args + [f"--{key}={_cli_value(value)}" for key, value in values.items()]

    # ------------------------------------------------------------------ study
    def study(self) -> optuna.Study:
        """The sweep's Optuna study (created on first use); heartbeats let stale trials of dead jobs fail."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():  # Optuna marks heartbeats experimental (since 2.9)
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            storage = optuna.storages.RDBStorage(self.storage, heartbeat_interval=60, grace_period=180)
        if self.sampler == "grid":
            categories = self.categories()
            sampler = _GridSampler({key: _choices(categories[key]) for key in self.grid}, seed=self.seed)
        else:
            sampler = optuna.samplers.TPESampler(seed=self.seed)
        return optuna.create_study(storage=storage, study_name=self.name, sampler=sampler,
                                   pruner=make_pruner(self.pruner), load_if_exists=True,
                                   direction="maximize" if self.mode == "max" else "minimize")


class _GridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, which also runs the trials the sweep enqueues (listed points, retries of
    failed ones): its ``after_trial`` reads a grid id that only the trials it assigned have."""

    def after_trial(self, study, trial, state, values) -> None:
        if "sweep_point" not in trial.user_attrs:
            super().after_trial(study, trial, state, values)


def make_pruner(spec: dict[str, Any]) -> optuna.pruners.BasePruner:
    """``{type: median, n_startup_trials: 5, ...}`` -> the Optuna pruner."""
    return PRUNERS[spec["type"]](**{k: v for k, v in spec.items() if k != "type"})


def _choices(values: list[Any]) -> list[Any]:
    return list(dict.fromkeys(_encode(v) for v in values))


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _slug(overrides: dict[str, Any], limit: int = 60) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}={_cli_value(value)}" for key, value in overrides.items()]
    return re.sub(r"[^A-Za-z0-9=.,_+-]+", "", "_".join(parts))[:limit] or "trial"


# -------------------------------------------------------------------- validation
def validate_trial_args(args: list[str]) -> dict:
    """Parse ``args`` with the project's CLI parser (nothing instantiated); return the full config as a dict.

    Raises :class:`SweepConfigError` with the parser's message for unknown keys or invalid values.
    """
    from focalnet_pl.cli import FocalNetCLI

    class _ParseOnlyCLI(FocalNetCLI):
        def instantiate_classes(self) -> None:  # validation only: build no model, data or trainer
            pass

    try:
        with warnings.catch_warnings():  # args given on purpose while sys.argv holds the sweep's own
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _ParseOnlyCLI(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except (argparse.ArgumentError, SystemExit, ValueError, TypeError) as err:
        raise SweepConfigError(str(err)) from err
    return yaml.safe_load(cli.parser.dump(cli.config, skip_check=True))


# ---------------------------------------------------------------------- running
class OptunaPruning(Callback):
    """Reports ``metric`` to the Optuna ``trial`` after each validation and stops the run when the
    study's pruner says so (all ranks stop: rank 0 decides, the decision is broadcast)."""

    def __init__(self, trial: optuna.Trial | None, metric: str) -> None:
        self.trial, self.metric = trial, metric

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if trainer.sanity_checking or value is None:
            return
        prune = False
        if trainer.is_global_zero and self.trial is not None:
            self.trial.report(float(value), step=trainer.global_step)
            prune = self.trial.should_prune()
        if trainer.strategy.broadcast(prune):
            raise optuna.TrialPruned(f"{self.metric} = {float(value):.4g} at step {trainer.global_step}")


def train_trial(command: str, args: list[str], metric: str, callbacks: list[Callback]) -> dict:
    """Run ``cli.py command args`` in this process; return the trial's score and run facts."""
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from focalnet_pl.cli import FocalNetCLI

    start = time.time()
    torch.set_float32_matmul_precision("high")
    with warnings.catch_warnings():  # args given on purpose while sys.argv holds the sweep's own
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
        trainer = FocalNetCLI(args=[command, *args], trainer_defaults={"callbacks": callbacks}).trainer
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    watching = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor == metric]
    best = next((cb for cb in watching if cb.best_model_score is not None), None)
    if best is not None:
        value, source = float(best.best_model_score), "best checkpoint"
    elif metric in final:
        value, source = final[metric], "last logged"
    else:
        raise KeyError(f"metric {metric!r} was never logged; logged: {sorted(final)}")
    return {"value": value, "value_source": source, "final_metrics": final, "global_step": trainer.global_step,
            "best_checkpoint": best.best_model_path if best is not None else None,
            "seconds": round(time.time() - start, 1)}


def objective(sweep: Sweep, trial: optuna.Trial, job: Any = None) -> float:
    """Train one trial (rank 0 of a job): suggest, write its folder, train with pruning, record the result."""
    keys = trial.user_attrs.get("sweep_keys") or list(sweep.grid or sweep.search_space)
    overrides = sweep.suggest(trial, keys)
    trial.set_user_attr("sweep_keys", keys)
    directory = sweep.output_dir / f"{trial.number:03d}-{_slug(overrides)}"
    directory.mkdir(parents=True, exist_ok=True)
    args = sweep.trial_args(overrides, directory)
    trial.set_user_attr("directory", str(directory))
    spec = {"number": trial.number, "overrides": overrides, "command": sweep.command, "args": args,
            "metric": sweep.metric, "sweep": str(sweep.source)}
    (directory / TRIAL_FILE).write_text(json.dumps(spec, indent=1))
    (directory / TRIAL_CONFIG_FILE).write_text(yaml.safe_dump(validate_trial_args(args), sort_keys=False))
    if job is not None:
        trial.set_user_attr("job_id", job.job_id)
        if job.num_tasks > 1:  # the job's other ranks train the same trial
            atomic_write(_handoff_file(sweep, job), lambda tmp: tmp.write_text(json.dumps(spec)))
    log.info("trial %d: %s", trial.number, " ".join(f"{k}={v}" for k, v in overrides.items()))
    results = train_trial(sweep.command, args, sweep.metric, [OptunaPruning(trial, sweep.metric)])
    trial.set_user_attr("best_checkpoint", results["best_checkpoint"])
    trial.set_user_attr("global_step", results["global_step"])
    (directory / RESULTS_FILE).write_text(json.dumps({"status": "ok", "metric": sweep.metric, **results}, indent=1))
    return results["value"]


def _handoff_file(sweep: Sweep, job: Any) -> Path:
    return sweep.output_dir / JOBS_FOLDER / f"{job.job_id}.trial.json"


def run_job(sweep_file: str, workdir: str) -> None:
    """What each local or SLURM job runs: one trial of the study (every rank of a multi-GPU job)."""
    import submitit

    os.chdir(workdir)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sweep, job = Sweep.from_yaml(sweep_file), submitit.JobEnvironment()
    handoff = _handoff_file(sweep, job)
    if job.global_rank == 0:
        sweep.study().optimize(lambda trial: objective(sweep, trial, job), n_trials=1, catch=(Exception,))
        if job.num_tasks > 1 and not handoff.is_file():  # failed before training: release the other ranks
            atomic_write(handoff, lambda tmp: tmp.write_text(json.dumps({"command": None})))
        return
    while not handoff.is_file():  # rank 0 asks the study for the trial
        time.sleep(1)
    spec = json.loads(handoff.read_text())
    if spec["command"] is None:
        return
    try:
        train_trial(spec["command"], spec["args"], spec["metric"], [OptunaPruning(None, spec["metric"])])
    except optuna.TrialPruned:
        pass


# ---------------------------------------------------------------------- sweeps
def prepare_study(sweep: Sweep, study: optuna.Study) -> int:
    """Enqueue the listed trials and failed ones not yet run again; return how many trials are left to run."""
    with warnings.catch_warnings():  # Optuna marks heartbeats experimental (since 2.9)
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)

    def point(t: optuna.trial.FrozenTrial) -> str:
        keys = t.user_attrs.get("sweep_keys") or list(t.params)
        return json.dumps({k: t.params[k] for k in keys if k in t.params} or t.user_attrs.get("sweep_point"),
                          sort_keys=True)

    covered = {point(t) for t in trials if t.state in DONE + ACTIVE}
    failed = [point(t) for t in trials if t.state == optuna.trial.TrialState.FAIL]
    listed = [json.dumps({k: _encode(v) for k, v in t.items()}, sort_keys=True) for t in sweep.trials]
    for encoded in dict.fromkeys(failed + listed):
        if encoded in covered or encoded == "null":  # "null": failed before it had parameters
            continue
        params = json.loads(encoded)
        study.enqueue_trial(params, user_attrs={"sweep_keys": list(params), "sweep_point": params})
        covered.add(encoded)
    states = [t.state for t in study.get_trials(deepcopy=False)]
    waiting = states.count(optuna.trial.TrialState.WAITING)
    if sweep.sampler == "tpe":  # n_trials finished ones in all
        done = sum(state in DONE for state in states)
        return max(sweep.n_trials - done - states.count(optuna.trial.TrialState.RUNNING), waiting)
    # the grid points no trial has taken yet (the grid sampler assigns them), and the queue
    grid = [json.dumps({k: _encode(v) for k, v in p.items()}, sort_keys=True) for p in sweep.grid_points()]
    return sum(point not in covered for point in grid) + waiting


def launch(sweep: Sweep, study: optuna.Study, count: int) -> None:
    """Run (local, inprocess) or submit (slurm) ``count`` trials."""
    if sweep.launcher == "inprocess":
        study.optimize(lambda trial: objective(sweep, trial), n_trials=count, catch=(Exception,))
        return
    import submitit

    folder = sweep.output_dir / JOBS_FOLDER
    if sweep.launcher == "slurm":
        slurm = dict(sweep.slurm)
        executor = submitit.SlurmExecutor(folder=folder, python=slurm.pop("python", None))
        gpus = slurm.pop("gpus_per_node", 1)
        executor.update_parameters(job_name=sweep.name, ntasks_per_node=gpus, gpus_per_node=gpus,
                                   time=_minutes(slurm.pop("time", "24:00:00")), **slurm)
    else:
        import torch

        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(gpus_per_node=torch.cuda.device_count(), timeout_min=7 * 24 * 60)
    for _ in range(count):
        job = executor.submit(run_job, str(sweep.source.resolve()), os.getcwd())
        if sweep.launcher == "slurm":
            atomic_write(folder / SUBMITTED_FILE, lambda tmp: tmp.write_text(json.dumps(_submitted(sweep) + [job.job_id])))
            log.info("submitted SLURM job %s (%s)", job.job_id, job.paths.submission_file)
            continue
        try:
            job.result()
        except Exception as err:  # noqa: BLE001 - the job died: its trial failed, the sweep goes on
            log.warning("local job %s failed (log: %s): %s", job.job_id, job.paths.stderr, err)
            for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if trial.user_attrs.get("job_id") == job.job_id:
                    study.tell(trial.number, state=optuna.trial.TrialState.FAIL)


def _submitted(sweep: Sweep) -> list[str]:
    path = sweep.output_dir / JOBS_FOLDER / SUBMITTED_FILE
    return json.loads(path.read_text()) if path.is_file() else []


def unstarted_jobs(sweep: Sweep, study: optuna.Study) -> int:
    """SLURM jobs of this sweep that have not taken a trial yet and are not over (queued, or unknown to
    ``sacct``): the trials they will run are not submitted again."""
    import submitit

    claimed = {t.user_attrs.get("job_id") for t in study.get_trials(deepcopy=False)}
    folder = sweep.output_dir / JOBS_FOLDER
    return sum(job_id not in claimed and not submitit.SlurmJob(folder, job_id).done() for job_id in _submitted(sweep))


def _minutes(time_limit: str | int) -> int:
    """SLURM time (``minutes``, ``HH:MM:SS``, ``D-HH:MM:SS``) -> minutes."""
    if isinstance(time_limit, int):
        return time_limit
    days, _, clock = time_limit.rpartition("-")
    parts = [int(p) for p in clock.split(":")]
    hours, minutes, seconds = ([0] * (3 - len(parts)) + parts) if len(parts) > 1 else (0, parts[0], 0)
    return int(days or 0) * 1440 + hours * 60 + minutes + (seconds > 0)


# ---------------------------------------------------------------------- reports
def write_reports(sweep: Sweep, study: optuna.Study) -> list[dict]:
    """``results.csv``, ``results.md`` (ranked) and ``best.yaml`` in the output folder; returns the ranked rows."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]
    keys = list(dict.fromkeys(k for t in trials for k in t.user_attrs.get("sweep_keys", t.params)))
    rows = []
    for t in trials:
        directory = Path(t.user_attrs.get("directory", ""))
        overrides = json.loads((directory / TRIAL_FILE).read_text())["overrides"] if directory.name else {}
        rows.append({"number": t.number, "trial": directory.name, **{k: overrides.get(k) for k in keys},
                     "status": STATUS[t.state.name], "value": t.value,
                     "best_checkpoint": t.user_attrs.get("best_checkpoint")})
    sign = -1 if sweep.mode == "max" else 1
    ranked = sorted(rows, key=lambda r: (r["status"] != "ok", sign * r["value"] if r["status"] == "ok" else 0,
                                         r["number"]))
    for position, row in enumerate(ranked, 1):
        row["rank"] = position if row["status"] == "ok" else None
    columns = ["rank", "trial", *keys, sweep.metric, "status", "best_checkpoint"]
    table = [{**row, sweep.metric: row["value"]} for row in ranked]
    with (sweep.output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    md = [f"# Sweep {sweep.source} ({sweep.metric}, {sweep.mode}; study {sweep.name} in {sweep.storage})", "",
          "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |" for row in table]
    (sweep.output_dir / "results.md").write_text("\n".join(md) + "\n")
    best = next((row for row in ranked if row["status"] == "ok"), None)
    if best is not None:
        config = (sweep.output_dir / best["trial"] / TRIAL_CONFIG_FILE).read_text()
        header = (f"# Best trial of {sweep.source}: {best['trial']} with {sweep.metric} = {best['value']}\n"
                  f"# python cli.py fit --config {sweep.output_dir / 'best.yaml'}\n")
        (sweep.output_dir / "best.yaml").write_text(header + config)
    return ranked


def run_sweep(path: str | Path, dry_run: bool = False) -> list[dict]:
    """Validate every trial, run (or submit) what is left of the study, write the reports; return ranked rows."""
    sweep = Sweep.from_yaml(path)
    points = sweep.points()
    for index, overrides in enumerate(points):  # everything is checked before the first trial starts
        try:
            validate_trial_args(sweep.trial_args(overrides, sweep.output_dir / "validation"))
        except SweepConfigError as err:
            raise SweepConfigError(f"{sweep.source}: trial {index} {overrides}: {err}") from err
    log.info("sweep %s: %d trial(s) valid", sweep.source, len(points))
    if dry_run:
        return [{"index": i, "overrides": p} for i, p in enumerate(points)]
    study = sweep.study()
    left = prepare_study(sweep, study) - (unstarted_jobs(sweep, study) if sweep.launcher == "slurm" else 0)
    log.info("sweep %s: %d trial(s) to run (study %s in %s)", sweep.source, left, sweep.name, sweep.storage)
    if left > 0:
        launch(sweep, study, left)
    ranked = write_reports(sweep, study)
    log.info("sweep %s: results in %s", sweep.source, sweep.output_dir / "results.md")
    return ranked


def main(argv: list[str] | None = None) -> None:
    """``cli.py sweep --config SWEEP.yaml [--dry-run]``."""
    parser = argparse.ArgumentParser(prog="cli.py sweep", description="Run a hyper-parameter sweep from YAML.")
    parser.add_argument("--config", required=True, help="sweep YAML (see focalnet_pl/sweep.py and sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the trials without running them")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        rows = run_sweep(args.config, dry_run=args.dry_run)
    except SweepConfigError as err:
        parser.exit(2, f"error: {err}\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

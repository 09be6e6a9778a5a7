"""Hyper-parameter sweeps from YAML: ``python cli.py sweep --config sweeps/<name>.yaml``.

A sweep file names the base config(s), the overrides to try (dotted CLI keys such as
``model.init_args.lr``, as a grid and/or an explicit list), the metric and its direction::

    base_configs: [configs/demo/classification_shapes.yaml]
    fixed: {trainer.max_epochs: 2}            # every trial
    grid: {model.init_args.lr: [1.0e-3, 3.0e-3], model.init_args.weight_decay: [0.0, 0.05]}
    trials: [{model.init_args.lr: 1.0e-2}]    # appended after the grid
    metric: val/acc1
    mode: max
    output_dir: runs/sweeps/demo_grid
    launcher: local                          # local (one subprocess per trial), inprocess, or slurm
    slurm: {nodes: 1, gpus_per_node: 8, time: "24:00:00", partition: gpu, submit: true}

Every trial's arguments go through the CLI parser before anything runs, so a key the CLI does not
know stops the sweep at once. Each trial trains in its own folder ``<output_dir>/<NNN>-<overrides>``
and leaves ``results.json`` there; a rerun skips finished trials. Results are written to
``results.csv`` and ``results.md`` (best first) and the best trial's full config to ``best.yaml``.
The trial's score is the best value of ``metric`` kept by a ``ModelCheckpoint`` monitoring it, or
else the value logged last.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import logging
import math
import re
import shlex
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

log = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
TRIAL_FILE = "trial.json"
TRIAL_CONFIG_FILE = "trial_config.yaml"
SBATCH_FILE = "job.sbatch"
SWEEP_KEYS = {"base_configs", "base_config", "command", "fixed", "grid", "trials", "metric", "mode", "output_dir",
              "launcher", "slurm", "name"}
SLURM_KEYS = {"nodes", "gpus_per_node", "cpus_per_task", "mem", "time", "partition", "account", "qos",
              "extra_directives", "setup", "python", "submit"}


class SweepConfigError(ValueError):
    """The sweep file or one of its trials is invalid (the message names the file, trial and key)."""


@dataclass
class SlurmSettings:
    """One ``sbatch`` job per trial: ``nodes`` x ``gpus_per_node`` processes started by ``srun``."""

    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_task: int = 8
    mem: str | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    extra_directives: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    python: str = "python"
    submit: bool = False


@dataclass
class Trial:
    """One point of the sweep: its index, the overrides it adds and its folder."""

    index: int
    overrides: dict[str, Any]
    directory: Path

    @property
    def name(self) -> str:
        return self.directory.name


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    source: Path
    base_configs: list[Path]
    metric: str
    mode: Literal["max", "min"]
    output_dir: Path
    command: str = "fit"
    fixed: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    trials: list[dict[str, Any]] = field(default_factory=list)
    launcher: Literal["local", "inprocess", "slurm"] = "local"
    slurm: SlurmSettings = field(default_factory=SlurmSettings)

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
        base_paths = [Path(b) for b in bases]
        missing = [str(b) for b in base_paths if not b.is_file()]
        if missing:
            raise SweepConfigError(f"{path}: base config file(s) not found: {missing}")
        if not spec.get("metric"):
            raise SweepConfigError(f"{path}: 'metric' (e.g. val/acc1) is required")
        mode = spec.get("mode", "max")
        if mode not in ("max", "min"):
            raise SweepConfigError(f"{path}: mode={mode!r}; use 'max' or 'min'")
        launcher = spec.get("launcher", "local")
        if launcher not in ("local", "inprocess", "slurm"):
            raise SweepConfigError(f"{path}: launcher={launcher!r}; use 'local', 'inprocess' or 'slurm'")
        grid = spec.get("grid") or {}
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise SweepConfigError(f"{path}: 'grid' must map dotted keys to non-empty lists of values")
        trials = spec.get("trials") or []
        if not isinstance(trials, list) or any(not isinstance(t, dict) for t in trials):
            raise SweepConfigError(f"{path}: 'trials' must be a list of mappings of dotted keys to values")
        fixed = spec.get("fixed") or {}
        if not isinstance(fixed, dict):
            raise SweepConfigError(f"{path}: 'fixed' must map dotted keys to values")
        slurm_spec = spec.get("slurm") or {}
        bad_slurm = sorted(set(slurm_spec) - SLURM_KEYS)
        if bad_slurm:
            raise SweepConfigError(f"{path}: unknown slurm key(s) {bad_slurm}; allowed: {sorted(SLURM_KEYS)}")
        name = spec.get("name") or path.stem
        output_dir = Path(spec.get("output_dir") or Path("runs") / "sweeps" / name)
        return cls(source=path, base_configs=base_paths, metric=str(spec["metric"]), mode=mode,
                   output_dir=output_dir, command=spec.get("command", "fit"), fixed=fixed, grid=grid,
                   trials=trials, launcher=launcher, slurm=SlurmSettings(**slurm_spec))

    # ----------------------------------------------------------------- trials
    def expand(self) -> list[Trial]:
        """Grid points (cartesian product, in file order) followed by the listed trials."""
        points: list[dict[str, Any]] = []
        if self.grid:
            keys = list(self.grid)
            points += [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]
        points += [dict(t) for t in self.trials]
        if not points:
            raise SweepConfigError(f"{self.source}: neither 'grid' nor 'trials' defines a trial")
        return [Trial(i, overrides, self.output_dir / f"{i:03d}-{_slug(overrides)}") for i, overrides in enumerate(points)]

    def trial_args(self, trial: Trial) -> list[str]:
        """CLI arguments of ``trial`` (without the subcommand): base configs, fixed and trial overrides."""
        args: list[str] = []
        for base in self.base_configs:
            args += ["--config", str(base)]
        overrides = dict(self.fixed) | dict(trial.overrides)
        overrides["trainer.default_root_dir"] = str(trial.directory)
        if self.launcher == "slurm":
            overrides["trainer.num_nodes"] = self.slurm.nodes
            overrides["trainer.devices"] = self.slurm.gpus_per_node
        return args + [f"--{key}={_cli_value(value)}" for key, value in overrides.items()]


def _cli_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _slug(overrides: dict[str, Any], limit: int = 60) -> str:
    parts = [f"{key.rsplit('.', 1)[-1]}={_cli_value(value)}" for key, value in overrides.items()]
    slug = re.sub(r"[^A-Za-z0-9=.,_+-]+", "", "_".join(parts))
    return slug[:limit] or "trial"


# -------------------------------------------------------------------- validation
def validate_trial_args(args: list[str]) -> dict:
    """Parse ``args`` with the project's CLI parser (nothing instantiated); return the full config as a dict.

    Raises :class:`SweepConfigError` with the parser's message for unknown keys or invalid values.
    """
    import argparse as _argparse

    from focalnet_pl.cli import FocalNetCLI

    class _ParseOnlyCLI(FocalNetCLI):
        def instantiate_classes(self) -> None:  # validation only: build no model, data or trainer
            pass

        def after_instantiate_classes(self) -> None:
            pass

    try:
        with warnings.catch_warnings():  # "args and command line arguments" is expected here
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            cli = _ParseOnlyCLI(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except (_argparse.ArgumentError, SystemExit, ValueError, TypeError) as err:
        raise SweepConfigError(str(err)) from err
    return yaml.safe_load(cli.parser.dump(cli.config, skip_check=True))


# ---------------------------------------------------------------------- running
def run_trial(directory: str | Path) -> dict:
    """Train the trial stored in ``directory`` in this process and write its ``results.json`` (rank 0).

    This is what each subprocess / SLURM job runs: ``python -m focalnet_pl.sweep --run-trial DIR``.
    """
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from focalnet_pl.cli import FocalNetCLI

    directory = Path(directory)
    spec = json.loads((directory / TRIAL_FILE).read_text())
    metric, start = spec["metric"], time.time()
    torch.set_float32_matmul_precision("high")
    cli = FocalNetCLI(args=[spec["command"], *spec["args"]])
    trainer = cli.trainer
    final = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    best = [cb.best_model_score for cb in trainer.checkpoint_callbacks
            if isinstance(cb, ModelCheckpoint) and cb.monitor == metric and cb.best_model_score is not None]
    if best:
        value, source = float(best[0]), "best checkpoint"
    elif metric in final:
        value, source = final[metric], "last logged"
    else:
        raise KeyError(f"trial {directory.name}: metric {metric!r} was never logged; logged: {sorted(final)}")
    best_path = next((cb.best_model_path for cb in trainer.checkpoint_callbacks
                      if isinstance(cb, ModelCheckpoint) and cb.monitor == metric and cb.best_model_path), None)
    results = {"status": "ok", "metric": metric, "value": value, "value_source": source, "final_metrics": final,
               "best_checkpoint": best_path, "global_step": trainer.global_step,
               "seconds": round(time.time() - start, 1)}
    if trainer.is_global_zero:
        (directory / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    return results


def _record_failure(directory: Path, metric: str, error: str) -> dict:
    results = {"status": "failed", "metric": metric, "value": None, "error": error[-2000:]}
    (directory / RESULTS_FILE).write_text(json.dumps(results, indent=1))
    return results


def read_results(trial: Trial) -> dict | None:
    path = trial.directory / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _prepare(sweep: Sweep, trial: Trial, args: list[str], config: dict) -> None:
    trial.directory.mkdir(parents=True, exist_ok=True)
    spec_file = trial.directory / TRIAL_FILE
    if spec_file.is_file():
        previous = json.loads(spec_file.read_text())
        if previous.get("overrides") != json.loads(json.dumps(trial.overrides)):
            raise SweepConfigError(
                f"{trial.directory} belongs to another trial (overrides {previous.get('overrides')}, now "
                f"{trial.overrides}): the sweep file changed; set another output_dir"
            )
    spec_file.write_text(json.dumps({"index": trial.index, "overrides": trial.overrides, "command": sweep.command,
                                     "args": args, "metric": sweep.metric, "sweep": str(sweep.source)}, indent=1))
    (trial.directory / TRIAL_CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))


def sbatch_script(sweep: Sweep, trial: Trial, workdir: Path | None = None) -> str:
    """The ``sbatch`` script that trains ``trial`` on ``slurm.nodes`` x ``slurm.gpus_per_node`` GPUs."""
    s = sweep.slurm
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={sweep.output_dir.name}-{trial.index:03d}",
             f"#SBATCH --nodes={s.nodes}",
             f"#SBATCH --ntasks-per-node={s.gpus_per_node}",
             f"#SBATCH --gpus-per-node={s.gpus_per_node}",
             f"#SBATCH --cpus-per-task={s.cpus_per_task}",
             f"#SBATCH --time={s.time}",
             f"#SBATCH --output={trial.directory.resolve()}/slurm-%j.out"]
    lines += [f"#SBATCH --{key}={value}" for key, value in
              (("partition", s.partition), ("account", s.account), ("qos", s.qos), ("mem", s.mem)) if value]
    lines += [f"#SBATCH {d}" for d in s.extra_directives]
    lines += ["set -euo pipefail", f"cd {shlex.quote(str((workdir or Path.cwd()).resolve()))}", *s.setup,
              "# one task per GPU; Lightning reads ranks and the master address from SLURM",
              f"srun {s.python} -m focalnet_pl.sweep --run-trial {shlex.quote(str(trial.directory.resolve()))}", ""]
    return "\n".join(lines)


def _launch(sweep: Sweep, trial: Trial) -> dict | None:
    if sweep.launcher == "inprocess":
        try:
            return run_trial(trial.directory)
        except Exception:  # noqa: BLE001 - a failed trial is recorded and the sweep goes on
            return _record_failure(trial.directory, sweep.metric, traceback.format_exc())
    if sweep.launcher == "local":
        log_file = trial.directory / "trial.log"
        with log_file.open("w") as out:
            code = subprocess.call([sys.executable, "-m", "focalnet_pl.sweep", "--run-trial", str(trial.directory)],
                                   stdout=out, stderr=subprocess.STDOUT)
        if code != 0:
            return _record_failure(trial.directory, sweep.metric,
                                   f"exit code {code}; see {log_file}:\n" + log_file.read_text()[-1500:])
        return read_results(trial)
    script = trial.directory / SBATCH_FILE
    script.write_text(sbatch_script(sweep, trial))
    if sweep.slurm.submit:
        job = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=True)
        (trial.directory / "slurm_job_id").write_text(job.stdout.strip())
        log.info("trial %s: submitted SLURM job %s", trial.name, job.stdout.strip())
    else:
        log.info("trial %s: wrote %s (submit with sbatch)", trial.name, script)
    return None


# ---------------------------------------------------------------------- reports
def rank(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """Finished trials best first (by ``mode``), then failed and pending ones."""
    def key(row: dict) -> tuple:
        value = row.get("value")
        if row.get("status") != "ok" or value is None or math.isnan(value):
            return (1, 0.0, row["index"])
        return (0, -value if sweep.mode == "max" else value, row["index"])

    return sorted(rows, key=key)


def write_reports(sweep: Sweep, trials: list[Trial]) -> list[dict]:
    """``results.csv``, ``results.md`` (ranked) and ``best.yaml`` in the output folder; returns the ranked rows."""
    keys = list(dict.fromkeys(k for t in trials for k in t.overrides))
    rows = []
    for trial in trials:
        result = read_results(trial) or {"status": "pending", "value": None}
        rows.append({"index": trial.index, "trial": trial.name, **{k: trial.overrides.get(k) for k in keys},
                     "status": result["status"], "value": result.get("value"),
                     "best_checkpoint": result.get("best_checkpoint")})
    ranked = rank(sweep, rows)
    for position, row in enumerate(ranked, 1):
        row["rank"] = position if row["status"] == "ok" else None
    columns = ["rank", "trial", *keys, sweep.metric, "status", "best_checkpoint"]
    table = [{**row, sweep.metric: row["value"]} for row in ranked]
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    with (sweep.output_dir / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    md = [f"# Sweep {sweep.source} ({sweep.metric}, {sweep.mode})", "",
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
    """Validate every trial, run (or submit) the unfinished ones in order, write the reports; return ranked rows."""
    sweep = Sweep.from_yaml(path)
    trials = sweep.expand()
    validated = []
    for trial in trials:  # everything is checked before the first trial starts
        args = sweep.trial_args(trial)
        try:
            validated.append((trial, args, validate_trial_args(args)))
        except SweepConfigError as err:
            raise SweepConfigError(f"{sweep.source}: trial {trial.index} {trial.overrides}: {err}") from err
    log.info("sweep %s: %d trials valid", sweep.source, len(trials))
    if dry_run:
        return [{"index": t.index, "trial": t.name, "args": a} for t, a, _ in validated]
    for trial, args, config in validated:
        result = read_results(trial)
        if result is not None and result.get("status") == "ok":
            log.info("trial %s: finished before (%s = %s), skipped", trial.name, sweep.metric, result["value"])
            continue
        if sweep.launcher == "slurm" and (trial.directory / "slurm_job_id").is_file():
            log.info("trial %s: SLURM job %s already submitted", trial.name,
                     (trial.directory / "slurm_job_id").read_text().strip())
            continue
        _prepare(sweep, trial, args, config)
        log.info("trial %s: %s", trial.name, " ".join(f"{k}={v}" for k, v in trial.overrides.items()))
        result = _launch(sweep, trial)
        if result is not None:
            log.info("trial %s: %s %s = %s", trial.name, result["status"], sweep.metric, result.get("value"))
    ranked = write_reports(sweep, trials)
    log.info("sweep %s: results in %s", sweep.source, sweep.output_dir / "results.md")
    return ranked


def main(argv: list[str] | None = None) -> None:
    """``cli.py sweep --config SWEEP.yaml [--dry-run]`` (``--run-trial DIR`` is what each trial job runs)."""
    parser = argparse.ArgumentParser(prog="cli.py sweep", description="Run a hyper-parameter sweep from YAML.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--config", help="sweep YAML (see focalnet_pl/sweep.py and sweeps/)")
    group.add_argument("--run-trial", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true", help="validate and list the trials without running them")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.run_trial:
        run_trial(args.run_trial)
        return
    try:
        rows = run_sweep(args.config, dry_run=args.dry_run)
    except SweepConfigError as err:
        parser.exit(2, f"error: {err}\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()

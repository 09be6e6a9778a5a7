"""Command line: ``python cli.py {fit,validate,test,predict} --config configs/....yaml``.

Models and datamodules are chosen in the YAML by ``class_path`` (any LightningModule /
LightningDataModule), so one CLI serves classification, detection and segmentation.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from datamodules.image_io import DataNotFoundError
from focalnet_pl.distributed import end_process_group
from focalnet_pl.io import load_checkpoint

CHECKPOINT_ALIASES = ("best", "last")

#: the Trainer plugins every CLI run gets unless the config sets ``trainer.plugins`` (then list it there too)
DEFAULT_PLUGINS = [{"class_path": "focalnet_pl.reliability.AtomicCheckpointIO"}]


def run_root(trainer) -> str:
    """Where a config's runs are written: its trainer's logger ``save_dir``, else ``default_root_dir``.

    ``trainer`` is the config's ``trainer`` section (a parsed namespace or a plain dict).
    """
    logger = trainer.get("logger")
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    save_dir = init_args.get("save_dir") if init_args else None
    return str(save_dir or trainer.get("default_root_dir") or "lightning_logs")


def resolve_checkpoint_alias(root: str | Path, alias: str) -> Path:
    """``best`` / ``last`` -> a file of the newest run under ``root`` (``lightning_logs/version_*``).

    Lightning resolves these names only inside the process that trained; a later ``test`` or
    ``predict`` (or a restart) finds them here. ``last`` is the newest ``checkpoints/last*.ckpt``
    (``last-v1.ckpt`` when a configured ``ModelCheckpoint`` shares the folder with the task's
    every-N-steps ``last.ckpt``); ``best`` is read from the ``ModelCheckpoint`` state stored in it.
    """
    runs = sorted(Path(root).glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"--ckpt_path {alias}: no checkpoints/last.ckpt under {Path(root).resolve()}")
    last = runs[-1]
    if alias == "last":
        return last
    state = load_checkpoint(last)
    for key, value in state.get("callbacks", {}).items():
        best = value.get("best_model_path") if key.startswith("ModelCheckpoint") else None
        if best and Path(best).is_file():
            return Path(best)
    raise FileNotFoundError(f"--ckpt_path best: {last} records no best checkpoint (no monitored metric yet?)")


class FocalNetCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data, config files saved next to the logs, atomic
    checkpoint writes (:data:`DEFAULT_PLUGINS`), seed 0 unless the config sets another,
    ``--ckpt_path best|last`` resolved across processes (:func:`resolve_checkpoint_alias`), model arguments
    given in ``--config`` files or on the command line winning over the hyper-parameters Lightning reads
    from ``--ckpt_path`` (those fill in only what the user left out, e.g. ``num_classes``), and ``predict``
    keeping no outputs in memory (the tasks' prediction writers write them; ``--return_predictions true``
    keeps them)."""

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        self.with_subcommands = run
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs["trainer_defaults"] = {"plugins": DEFAULT_PLUGINS} | kwargs.get("trainer_defaults", {})
        self._given_model_args: Namespace | None = None
        quiet_lightning()
        super().__init__(
            subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
            parser_kwargs={"parser_mode": "omegaconf"} | kwargs.pop("parser_kwargs", {}), **kwargs,
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, turn ``ckpt_path: best|last`` into the file (before Lightning reads its hyper-parameters)
        and, with a checkpoint, keep the model arguments the user gave (see :meth:`before_instantiate_classes`)."""
        if self.with_subcommands:
            parser.set_defaults({"predict.return_predictions": False})
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        section = self.config[subcommand] if subcommand else None
        alias = section.get("ckpt_path") if section is not None else None
        if alias in CHECKPOINT_ALIASES:
            try:
                section.ckpt_path = str(resolve_checkpoint_alias(run_root(section.trainer), alias))
            except FileNotFoundError:
                if not (subcommand == "fit" and alias == "last"):  # fit: Lightning starts afresh
                    raise
        if section is not None and section.get("ckpt_path"):
            # the same arguments without defaults: only what --config files and the command line set
            given = parser.parse_object(args, defaults=False) if isinstance(args, (dict, Namespace)) \
                else parser.parse_args(args, defaults=False)
            self._given_model_args = given[subcommand].get("model.init_args")

    def before_instantiate_classes(self) -> None:
        """Put back the model arguments the user gave over the checkpoint's hyper-parameters, which
        LightningCLI applies to the config for ``--ckpt_path`` (e.g. ``--model.init_args.predict_output_dir``)."""
        if self._given_model_args is None or self.subcommand is None:
            return
        init_args = self.config[self.subcommand].model.init_args
        for key, value in vars(self._given_model_args).items():
            init_args[key] = value


def quiet_lightning() -> None:
    """Silence, narrowly, what every run would print that tells the user nothing about their run.

    * Lightning's promotional tips (litlogger, litmodels): info records starting with "💡 Tip:";
    * the deprecation warning that Lightning's own pytree helper triggers with recent torch (2.14 here:
      ``isinstance(treespec, LeafSpec)``): caused neither by the user's code nor by ours.
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_drop_promotional_tips)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            module=r"lightning\.pytorch\.utilities\._pytree")


def _drop_promotional_tips(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


#: subcommands beyond Lightning's fit/validate/test/predict: name -> module with ``main(argv)``
EXTRA_COMMANDS = {
    "sweep": "focalnet_pl.sweep",
    "export": "focalnet_pl.export",
    "modulation-maps": "focalnet_pl.visualize.modulation",
    "consolidate": "focalnet_pl.distributed",
    "zoo": "focalnet_pl.zoo",
    "inspect": "focalnet_pl.describe",
}


#: set to 1 (or pass ``--debug``) to see the traceback of errors ``main`` otherwise prints as one message
DEBUG_ENV = "FOCALNET_PL_DEBUG"
#: exit status of a run stopped by missing data
MISSING_DATA_EXIT_CODE = 2


def _missing_data(error: BaseException) -> DataNotFoundError | None:
    """The :class:`DataNotFoundError` behind ``error`` (itself or a cause: jsonargparse wraps the errors
    of the classes it instantiates), else ``None``."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DataNotFoundError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cli.py`` and the ``focalnet-pl`` console script (``args``: default ``sys.argv[1:]``).

    Missing data (:class:`~datamodules.image_io.DataNotFoundError`) ends the run with its message on
    stderr and exit status 2, without a traceback (``--debug`` or ``FOCALNET_PL_DEBUG=1`` shows it).
    """
    argv = sys.argv[1:] if args is None else list(args)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "0") not in ("", "0")
    if "--debug" in argv:
        argv = [arg for arg in argv if arg != "--debug"]
        if args is None:
            sys.argv = sys.argv[:1] + argv
        else:
            args = argv
    try:
        if argv and argv[0] in EXTRA_COMMANDS:
            importlib.import_module(EXTRA_COMMANDS[argv[0]]).main(argv[1:])
            return
        torch.set_float32_matmul_precision("high")
        FocalNetCLI(args=args)  # None: LightningCLI reads sys.argv itself (no "args and sys.argv" warning)
        end_process_group()
    except Exception as error:
        missing = _missing_data(error)
        if debug or missing is None:
            raise
        print(f"error: {missing}\n(run with --debug or {DEBUG_ENV}=1 for the traceback)", file=sys.stderr, flush=True)
        sys.exit(MISSING_DATA_EXIT_CODE)


if __name__ == "__main__":
    main()

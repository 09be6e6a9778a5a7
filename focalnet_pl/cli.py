"""Command line: ``python cli.py {fit,validate,test,predict} --config configs/....yaml``.

Models and datamodules are chosen in the YAML by ``class_path`` (any LightningModule /
LightningDataModule), so one CLI serves classification, detection and segmentation.
"""
from __future__ import annotations

import importlib
import sys

import torch
from lightning.pytorch.cli import LightningCLI


class FocalNetCLI(LightningCLI):
    """LightningCLI with subclass mode for model and data, and config files saved next to the logs."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(
            subclass_mode_model=True, subclass_mode_data=True, args=args, run=run,
            parser_kwargs={"parser_mode": "omegaconf"} | kwargs.pop("parser_kwargs", {}), **kwargs,
        )


#: subcommands beyond Lightning's fit/validate/test/predict: name -> module with ``main(argv)``
EXTRA_COMMANDS = {
    "sweep": "focalnet_pl.sweep",
    "export": "focalnet_pl.export",
    "modulation-maps": "focalnet_pl.visualize.modulation",
}


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cli.py`` and the ``focalnet-pl`` console script."""
    args = list(sys.argv[1:] if args is None else args)
    if args and args[0] in EXTRA_COMMANDS:
        importlib.import_module(EXTRA_COMMANDS[args[0]]).main(args[1:])
        return
    torch.set_float32_matmul_precision("high")
    FocalNetCLI(args=args)


if __name__ == "__main__":
    main()

"""Command line: ``python cli.py {fit,validate,test,predict} --config configs/....yaml``.

Models and datamodules are chosen in the YAML by ``class_path`` (any LightningModule /
LightningDataModule), so one CLI serves classification, detection and segmentation.
"""
from __future__ import annotations

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


def main(args: list[str] | None = None) -> None:
    """Entry point of ``cli.py`` and the ``focalnet-pl`` console script."""
    torch.set_float32_matmul_precision("high")
    FocalNetCLI(args=args if args is not None else sys.argv[1:])


if __name__ == "__main__":
    main()

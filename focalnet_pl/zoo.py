"""The released FocalNet checkpoints as data (``focalnet_pl/zoo.yaml``) and ``focalnet-pl zoo``.

    focalnet-pl zoo                      # every checkpoint: name, task, reported numbers, config
    focalnet-pl zoo mask_rcnn_focalnet_t_srf_1x   # one entry in full, with the command that evaluates it

``weights="zoo:NAME"`` (:func:`focalnet_pl.create_focalnet`, ``ClassificationTask``) and
``MODEL.WEIGHTS: zoo:NAME`` / ``DetectionTask(weights="zoo:NAME")`` fetch the file over https into
the download cache (see :func:`focalnet_pl.weights.resolve_source`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

__all__ = ["ZOO_PREFIX", "ZooEntry", "list_zoo", "zoo_entry"]

#: ``weights`` / ``MODEL.WEIGHTS`` values naming a zoo entry start with this.
ZOO_PREFIX = "zoo:"


@dataclass(frozen=True)
class ZooEntry:
    """One released checkpoint (a row of ``zoo.yaml``)."""

    name: str
    task: str  # classification | detection
    dataset: str
    variant: str  # our FocalNet variant (focalnet_pl.list_variants())
    num_classes: int
    image_size: int | list[int]  # classification: square side; detection: [short side, max side]
    file: str
    url: str
    readme: str  # where the reported numbers come from
    config: str  # our config (repository path) that evaluates it
    sha256: str | None = None
    reported: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def source(self) -> str:
        return f"{ZOO_PREFIX}{self.name}"

    def command(self) -> str:
        """The command that evaluates (or, for pretraining checkpoints, uses) this checkpoint."""
        command = f"python cli.py test --config {self.config} --model.init_args.weights {self.source}"
        if self.task == "classification":  # one fine-tuning config serves every 22K variant
            command += f" --model.init_args.variant {self.variant} --data.init_args.image_size {self.image_size}"
        return command


@lru_cache(maxsize=1)
def _table() -> dict[str, ZooEntry]:
    data = yaml.safe_load(resources.files("focalnet_pl").joinpath("zoo.yaml").read_text())
    return {name: ZooEntry(name=name, **row) for name, row in data["checkpoints"].items()}


def list_zoo(task: str | None = None) -> list[ZooEntry]:
    """Every released checkpoint (of ``task`` when given), in table order."""
    return [entry for entry in _table().values() if task is None or entry.task == task]


def zoo_entry(name: str) -> ZooEntry:
    """The entry ``name`` (``zoo:`` prefix allowed); an unknown name raises listing the known ones."""
    name = name.removeprefix(ZOO_PREFIX)
    table = _table()
    if name not in table:
        raise KeyError(f"no checkpoint {name!r} in the FocalNet zoo; known: {', '.join(table)}")
    return table[name]


def _numbers(reported: dict[str, Any]) -> str:
    return ", ".join(f"{key} {value}" for key, value in reported.items()) or "-"


def main(argv: list[str]) -> None:
    """``focalnet-pl zoo [NAME] [--task classification|detection]``."""
    parser = argparse.ArgumentParser(prog="focalnet-pl zoo", description="The released FocalNet checkpoints.")
    parser.add_argument("name", nargs="?", help="show one entry in full")
    parser.add_argument("--task", choices=("classification", "detection"))
    args = parser.parse_args(argv)
    if args.name:
        entry = zoo_entry(args.name)
        for key in ("name", "task", "dataset", "variant", "num_classes", "image_size", "file", "url", "sha256",
                    "readme", "config", "note"):
            print(f"{key:12s} {getattr(entry, key)}")
        print(f"{'reported':12s} {_numbers(entry.reported)}")
        print(f"{'weights':12s} {entry.source}")
        print(f"{'evaluate':12s} {entry.command()}")
        return
    entries = list_zoo(args.task)
    width = max(len(entry.name) for entry in entries)
    print(f"{'name':{width}s}  {'task':14s} {'dataset':12s} {'reported':44s} config")
    for entry in entries:
        print(f"{entry.name:{width}s}  {entry.task:14s} {entry.dataset:12s} {_numbers(entry.reported):44s} {entry.config}")
    print(f"\n{len(entries)} checkpoints. Use one as weights=\"zoo:NAME\" (or MODEL.WEIGHTS: zoo:NAME); "
          "`focalnet-pl zoo NAME` shows its URL and the command that evaluates it.")

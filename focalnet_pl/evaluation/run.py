"""One evaluation pass (a validation or test epoch) of a detectron2 model: the evaluators of the data
for the model's outputs, fed batch by batch, then scored, printed and written."""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from detectron2.data import Metadata

from focalnet_pl.evaluation.evaluator import DatasetEvaluators, build_evaluators, format_metrics_table, summary_metrics

__all__ = ["EvaluationData", "EvaluationRun"]


class EvaluationData(Protocol):
    """What an evaluation reads of the data (a subset of :class:`focalnet_pl.tasks.data.DetectronData`)."""

    def dataset_metadata(self, split: str) -> Metadata: ...

    def instance_ground_truth(self, split: str) -> str | Mapping[str, Any]: ...


class EvaluationRun:
    """The evaluation of a model giving ``outputs`` (:data:`focalnet_pl.evaluation.OUTPUT_KINDS`), one
    stage at a time: :meth:`start`, :meth:`process` each batch, :meth:`finish`."""

    def __init__(self, outputs: Collection[str]) -> None:
        self.outputs = frozenset(outputs)
        self.evaluators: DatasetEvaluators | None = None
        self.stage = ""
        self.title = ""
        self.output_dir = Path()

    def start(self, stage: str, data: EvaluationData | None, output_dir: str | Path, epoch: int | None = None) -> None:
        """Build the evaluators of ``data``'s split for ``stage`` (``val`` / ``test``); their results files,
        and :meth:`finish`'s ``{stage}_metrics.json``, go to ``output_dir``."""
        if data is None:
            raise ValueError(f"{stage} needs a datamodule with evaluation data (e.g. COCODataModule)")
        split = "val" if stage == "val" else "test"
        self.stage, self.output_dir = stage, Path(output_dir)
        self.title = f"{stage}{f' (epoch {epoch})' if epoch is not None else ''}:"
        self.evaluators = build_evaluators(data.dataset_metadata(split), self.outputs,
                                           lambda: data.instance_ground_truth(split), self.output_dir, f"{stage}_")

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Hand one batch of model ``inputs`` and their ``outputs`` to the evaluators."""
        if self.evaluators is None:
            raise RuntimeError("EvaluationRun.process before start")
        self.evaluators.process(inputs, outputs)

    def finish(self, write: bool = True) -> dict[str, float]:
        """Score the stage (identical on every rank: gathered) and return its summary metrics as
        ``{stage}/{name}``; with ``write`` (one rank) also print the table and write every metric to
        ``{stage}_metrics.json``."""
        if self.evaluators is None:
            raise RuntimeError("EvaluationRun.finish before start")
        metrics = self.evaluators.evaluate()
        self.evaluators = None
        if write:
            print(format_metrics_table(metrics, self.title), flush=True)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / f"{self.stage}_metrics.json").write_text(json.dumps(metrics, indent=1))
        return {f"{self.stage}/{name}": value for name, value in summary_metrics(metrics).items()}

"""Prediction writers: Lightning ``BasePredictionWriter`` callbacks that turn ``predict`` outputs into files."""
from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_warn

from focalnet_pl.evaluation.gather import gather_unique_by_key

__all__ = ["COCOSubmissionWriter"]

log = logging.getLogger(__name__)


class COCOSubmissionWriter(BasePredictionWriter):
    """Writes the detections of ``cli.py predict`` as a COCO evaluation-server submission.

    The task's ``predict_step`` returns COCO results entries (``image_id``, original ``category_id``,
    ``bbox`` as xywh, ``score`` and, for mask models, an RLE ``segmentation``); this writer keeps
    them per image (across ranks, each image once) and writes
    ``detections_<split>_<name>_results.json`` and the ``.zip`` holding it, which is what the server
    takes. The image ids must be COCO's: predict on a folder with ``predict_image_info`` (e.g.
    ``image_info_test-dev2017.json``) or on an annotated split; otherwise nothing is written (with a
    warning saying so).

    Args:
        name: the method's name in the file names (the server shows it).
        output_dir: where the files go; default: the task's ``predict_output_dir``, else the
            trainer's ``default_root_dir``.
        split: the split in the file names; default: the data's (``test-dev2017`` for
            ``image_info_test-dev2017.json``, ``val2017`` for the val split).
    """

    def __init__(self, name: str = "focalnet", output_dir: str | None = None, split: str | None = None) -> None:
        super().__init__(write_interval="batch")
        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"submission name must be non-empty without slashes or spaces, got {name!r}")
        self.name = name
        self.output_dir = output_dir
        self.split = split
        self._results: dict[int, list[dict]] = {}

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._results = {}

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        per_image: dict[int, list[dict]] = {int(record["image_id"]): [] for record in batch}
        for entry in prediction:
            per_image[int(entry["image_id"])].append(entry)
        self._results.update(per_image)

    def _split(self, trainer: L.Trainer) -> str | None:
        return self.split or getattr(trainer.datamodule, "predict_split_name", None)

    def _output_dir(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        task_dir = getattr(pl_module, "hparams", {}).get("predict_output_dir")
        return Path(task_dir or trainer.default_root_dir)

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        merged = gather_unique_by_key(self._results)
        self._results = {}
        if not trainer.is_global_zero:
            return
        split = self._split(trainer)
        if split is None:
            rank_zero_warn(
                "COCOSubmissionWriter: no submission written: the predict images carry no COCO image ids. "
                "Set --data.init_args.predict_image_info to the split's image-info json (for COCO test-dev: "
                "annotations/image_info_test-dev2017.json) with --data.init_args.predict_images its image folder."
            )
            return
        results = [entry for image_id in sorted(merged) for entry in merged[image_id]]
        self._check_categories(trainer, results)
        stem = f"detections_{split}_{self.name}_results"
        out = self._output_dir(trainer, pl_module)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps(results))
        zip_path = out / f"{stem}.zip"
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(json_path, arcname=json_path.name)
        print(f"predict: wrote the COCO submission {zip_path} ({len(results)} detections on {len(merged)} images)",
              flush=True)

    @staticmethod
    def _check_categories(trainer: L.Trainer, results: list[dict]) -> None:
        """Every category id must be one the image-info json lists (when it lists categories)."""
        categories = getattr(trainer.datamodule, "predict_categories", None)
        if not categories:
            return
        unknown = sorted({entry["category_id"] for entry in results} - {c["id"] for c in categories})
        if unknown:
            raise ValueError(
                f"predicted category ids {unknown[:10]} are not among the categories of the image-info json "
                f"({len(categories)} categories): the model's classes (from its training data) do not match that split"
            )

"""Prediction writers: Lightning ``BasePredictionWriter`` callbacks that turn ``predict`` outputs into files.

The classification task's ``predict_step`` gives one dict per image (``file``, ``top5``), written by
:class:`TopKWriter`. The detectron2-model tasks' ``predict_step`` gives one dict per image: ``image`` (``id``, ``file_name``,
``height``, ``width``) and the model's outputs (``instances``, ``sem_seg``, ``panoptic_seg``); the task's
``class_metadata`` names the classes and maps them to dataset ids. Each writer makes one kind of file of
them; the task adds those of its outputs unless the trainer has writers of those kinds already.
"""
from __future__ import annotations

import json
import logging
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Collection, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image

from focalnet_pl.evaluation.coco import instances_to_coco_results
from focalnet_pl.evaluation.gather import gather_unique_by_key
from focalnet_pl.io import atomic_write
from focalnet_pl.visualize.draw import draw_detectron2_output, draw_top5, load_picture, save_picture

__all__ = ["COCOResultsWriter", "COCOSubmissionWriter", "OverlayWriter", "PerImageWriter", "SegmentsWriter", "TopKWriter",
           "detectron2_writers"]

log = logging.getLogger(__name__)


def coco_results(pl_module: L.LightningModule, prediction: dict) -> list[dict]:
    """COCO results entries (dataset category ids; RLE masks when the model gives masks) of one image."""
    metadata = pl_module.class_metadata
    to_dataset = {v: k for k, v in metadata.thing_dataset_id_to_contiguous_id.items()}
    instances = prediction["instances"]
    return instances_to_coco_results(instances, prediction["image"]["id"], to_dataset, instances.has("pred_masks"))


class PerImageWriter(BasePredictionWriter, ABC):
    """Keeps an entry per predicted image (across ranks, each image once: distributed samplers repeat a
    few) and writes them, ordered by key, on rank 0 at the end of ``predict``."""

    def __init__(self) -> None:
        super().__init__(write_interval="batch")
        self._entries: dict[Hashable, Any] = {}

    @abstractmethod
    def entries(self, pl_module: L.LightningModule, predictions: Sequence[dict]) -> dict[Hashable, Any]:
        """The entries of one batch's predictions, keyed by image."""

    @abstractmethod
    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, entries: list[Any]) -> None:
        """Write the entries of every image (rank 0 only)."""

    def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._entries = {}

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._entries.update(self.entries(pl_module, prediction))

    def on_predict_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        merged = gather_unique_by_key(self._entries)
        self._entries = {}
        if trainer.is_global_zero:
            self.write(trainer, pl_module, [merged[key] for key in sorted(merged)])


class TopKWriter(PerImageWriter):
    """``predictions.json`` under ``output_dir``: the top-k classes of every image (``file``, ``top5``: class id,
    label, score), ordered by file; with ``draw``, each image with its labels under ``images/`` too (its path in
    the entry's ``picture``)."""

    def __init__(self, output_dir: str, draw: bool = False) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.draw = draw

    def entries(self, pl_module: L.LightningModule, predictions: Sequence[dict]) -> dict[Hashable, Any]:
        if self.draw:
            for result in predictions:
                picture = draw_top5(load_picture(result["file"]), result["top5"])
                result["picture"] = str(save_picture(picture, self.output_dir / "images", result["file"]))
        return {result["file"]: result for result in predictions}

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, entries: list[Any]) -> None:
        path = self.output_dir / "predictions.json"
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(entries, indent=1)))
        log.info("Wrote %d predictions to %s", len(entries), path)


class OverlayWriter(BasePredictionWriter):
    """Draws each image's prediction on it (:func:`~focalnet_pl.visualize.draw.draw_detectron2_output`) and
    saves ``<output_dir>/<image file stem>.png``.

    Args:
        output_dir: where the pictures go.
        score_threshold: minimum score of the instances drawn.
        overlay_alpha: opacity of the segments drawn.
    """

    def __init__(self, output_dir: str, score_threshold: float = 0.5, overlay_alpha: float = 0.5) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.score_threshold = score_threshold
        self.overlay_alpha = overlay_alpha

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        from detectron2.data.detection_utils import read_image  # noqa: PLC0415 (detectron2 only where drawn)

        self.output_dir.mkdir(parents=True, exist_ok=True)
        for image_prediction in prediction:
            file_name = image_prediction["image"]["file_name"]
            drawn = draw_detectron2_output(read_image(file_name, format="RGB"), image_prediction,
                                           pl_module.class_metadata, self.score_threshold, self.overlay_alpha)
            Image.fromarray(drawn).save(self.output_dir / f"{Path(file_name).stem}.png")


class COCOResultsWriter(PerImageWriter):
    """Writes the detections as COCO results (``coco_results.json``) and the images and categories they
    refer to (``images.json``: ``images`` with ``id``, ``file_name``, ``height``, ``width``; ``categories``)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)

    def entries(self, pl_module: L.LightningModule, predictions: Sequence[dict]) -> dict[Hashable, Any]:
        return {int(p["image"]["id"]): (p["image"], coco_results(pl_module, p)) for p in predictions}

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, entries: list[Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "coco_results.json").write_text(json.dumps([r for _, results in entries for r in results]))
        metadata = pl_module.class_metadata
        categories = [{"id": dataset_id, "name": metadata.thing_classes[index]}
                      for dataset_id, index in sorted(metadata.thing_dataset_id_to_contiguous_id.items())]
        images = [{"id": int(image["id"]), "file_name": str(image["file_name"]), "height": int(image["height"]),
                   "width": int(image["width"])} for image, _ in entries]
        (self.output_dir / "images.json").write_text(json.dumps({"images": images, "categories": categories}))
        print(f"predict: wrote {len(entries)} drawn images, coco_results.json and images.json to {self.output_dir}",
              flush=True)


class SegmentsWriter(PerImageWriter):
    """Writes ``segments.json``: per image its ``image_id``, ``file_name`` and, for panoptic outputs, the
    ``segments_info`` of its segments (ids as in the segment map, contiguous ``category_id``)."""

    def __init__(self, output_dir: str) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)

    def entries(self, pl_module: L.LightningModule, predictions: Sequence[dict]) -> dict[Hashable, Any]:
        summaries = {}
        for prediction in predictions:
            image = prediction["image"]
            summary: dict[str, Any] = {"image_id": image["id"], "file_name": str(image["file_name"])}
            if "panoptic_seg" in prediction:
                summary["segments_info"] = prediction["panoptic_seg"][1]
            summaries[str(image["id"])] = summary
        return summaries

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, entries: list[Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "segments.json").write_text(json.dumps(entries))
        print(f"predict: wrote {len(entries)} overlays and segments.json to {self.output_dir}", flush=True)


class COCOSubmissionWriter(PerImageWriter):
    """Writes the detections of ``cli.py predict`` as a COCO evaluation-server submission.

    Each image's detections become COCO results entries (``image_id``, original ``category_id``,
    ``bbox`` as xywh, ``score`` and, for mask models, an RLE ``segmentation``), kept per image (across
    ranks, each image once); this writer writes
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
        super().__init__()
        if not name or any(c in name for c in "/\\ "):
            raise ValueError(f"submission name must be non-empty without slashes or spaces, got {name!r}")
        self.name = name
        self.output_dir = output_dir
        self.split = split

    def entries(self, pl_module: L.LightningModule, predictions: Sequence[dict]) -> dict[Hashable, Any]:
        return {int(p["image"]["id"]): coco_results(pl_module, p) for p in predictions}

    def _split(self, trainer: L.Trainer) -> str | None:
        return self.split or getattr(trainer.datamodule, "predict_split_name", None)

    def _output_dir(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        task_dir = getattr(pl_module, "hparams", {}).get("predict_output_dir")
        return Path(task_dir or trainer.default_root_dir)

    def write(self, trainer: L.Trainer, pl_module: L.LightningModule, entries: list[Any]) -> None:
        split = self._split(trainer)
        if split is None:
            rank_zero_warn(
                "COCOSubmissionWriter: no submission written: the predict images carry no COCO image ids. "
                "Set --data.init_args.predict_image_info to the split's image-info json (for COCO test-dev: "
                "annotations/image_info_test-dev2017.json) with --data.init_args.predict_images its image folder."
            )
            return
        results = [entry for image_results in entries for entry in image_results]
        self._check_categories(trainer, results)
        stem = f"detections_{split}_{self.name}_results"
        out = self._output_dir(trainer, pl_module)
        out.mkdir(parents=True, exist_ok=True)
        json_path = out / f"{stem}.json"
        json_path.write_text(json.dumps(results))
        zip_path = out / f"{stem}.zip"
        with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.write(json_path, arcname=json_path.name)
        print(f"predict: wrote the COCO submission {zip_path} ({len(results)} detections on {len(entries)} images)",
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


def detectron2_writers(outputs: Collection[str], output_dir: str | Path, score_threshold: float, overlay_alpha: float,
                       present: Iterable[Callback] = ()) -> list[BasePredictionWriter]:
    """The writers of a detectron2 model giving ``outputs`` that ``present`` has no writer of the kind of:
    drawn images, and COCO results (instance models) or segments (segmentation models)."""
    segmentation = bool({"sem_seg", "panoptic_seg"} & set(outputs))
    writers = [OverlayWriter(output_dir, score_threshold, overlay_alpha),
               SegmentsWriter(output_dir) if segmentation else COCOResultsWriter(output_dir)]
    kinds = {type(callback) for callback in present}
    return [writer for writer in writers if type(writer) not in kinds]

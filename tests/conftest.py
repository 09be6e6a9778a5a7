import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("MPLBACKEND", "Agg")
# the CPU fast paths without measuring them first (tests check numbers, not speed; test_cpu_fastpath.py
# tests the measuring itself)
os.environ.setdefault("FOCALNET_PL_CPU_FASTPATH", "on")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Tiny models run faster single-threaded on a shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def make_coco_dataset(tmp_path_factory):
    """``make_coco_dataset(categories)``: a new small COCO instances dataset (see :func:`write_coco_dataset`)."""
    return lambda categories: write_coco_dataset(tmp_path_factory.mktemp("coco"), categories)


@pytest.fixture(scope="session")
def small_coco(make_coco_dataset) -> Path:
    """A 6 + 4 image COCO instances dataset (jpg + json, non-contiguous category ids 1 and 3)."""
    return make_coco_dataset([(1, "red"), (3, "blue")])


def write_coco_dataset(root: Path, categories: list[tuple[int, str]], sizes: tuple[int, int] = (6, 4),
                       shapes: Sequence[tuple[int, int]] = ((64, 80),)) -> Path:
    """A small COCO instances dataset under ``root`` (train2017 / val2017 jpgs and their jsons): images of
    ``shapes`` (height, width >= 64; taken in turn) with 1-2 solid boxes each, one colour per category ``(id, name)``."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    palette = [[230, 50, 50], [50, 50, 230], [50, 200, 50], [220, 200, 40], [200, 60, 200], [40, 200, 210]]
    (root / "annotations").mkdir(parents=True)
    for split, count in zip(("train2017", "val2017"), sizes):
        (root / split).mkdir()
        images, annotations = [], []
        for image_id in range(1, count + 1):
            height, width = shapes[(image_id - 1) % len(shapes)]
            pixels = torch.full((height, width, 3), 40, dtype=torch.uint8)
            for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
                x, y = (int(v) for v in torch.randint(0, 44, (2,), generator=gen))
                w, h = (int(v) for v in torch.randint(12, 20, (2,), generator=gen))
                index = int(torch.randint(0, len(categories), (1,), generator=gen))
                pixels[y : y + h, x : x + w] = torch.tensor(palette[index % len(palette)])
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": categories[index][0],
                                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            Image.fromarray(pixels.numpy()).save(root / split / f"{image_id:06d}.jpg")
            images.append({"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": width, "height": height})
        coco_categories = [{"id": i, "name": name, "supercategory": "box"} for i, name in categories]
        (root / "annotations" / f"instances_{split}.json").write_text(
            json.dumps({"images": images, "annotations": annotations, "categories": coco_categories})
        )
    return root


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def deep_merge(base: dict, overrides: dict) -> dict:
    """``overrides`` merged into ``base`` (nested dicts merged, other values replaced); returns ``base``."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = value
    return base


@pytest.fixture
def small_cli_config(tmp_path):
    """``small_cli_config(name, coco_root, model_overrides)``: the shipped detection config
    ``configs/<name>.yaml`` for a CPU test (its ``MODEL`` merged with ``model_overrides``, the COCO dataset
    at ``coco_root`` at 64-96 px, 1 epoch of 2 steps, no logger), written to ``tmp_path/config.yaml``."""

    def write(name: str, coco_root: Path, model_overrides: dict) -> Path:
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        deep_merge(config["model"]["init_args"]["detectron2"]["MODEL"], model_overrides)
        config["data"]["init_args"] = deep_merge(
            {k: v for k, v in config["data"]["init_args"].items() if k not in ("root", "demo")},
            {
                "train_json": str(coco_root / "annotations/instances_train2017.json"),
                "train_images": str(coco_root / "train2017"),
                "val_json": str(coco_root / "annotations/instances_val2017.json"),
                "val_images": str(coco_root / "val2017"),
                "train_min_sizes": [64, 80], "train_max_size": 96, "crop_resize_sizes": [64], "crop_size": [48, 64],
                "test_min_size": 64, "test_max_size": 96, "batch_size": 2, "eval_batch_size": 2, "num_workers": 0,
            },
        )
        config["trainer"].update({
            "accelerator": "cpu", "devices": 1, "strategy": "auto", "max_epochs": 1, "limit_train_batches": 2,
            "limit_val_batches": 2, "limit_test_batches": 2, "check_val_every_n_epoch": 1, "num_sanity_val_steps": 0,
            "logger": False, "enable_progress_bar": False, "default_root_dir": str(tmp_path),
        })
        config["trainer"].pop("callbacks", None)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    return write

"""``cli.py test`` gives the same results at evaluation batch sizes 1 and 4 (``MODEL.MASK_PADDING``).

Images of four different sizes are padded differently at each batch size; with trained-like weights
(every parameter of a tiny model perturbed) each image's detections / segments, and so COCO AP, PQ and
mIoU, must not change. With ``MODEL.MASK_PADDING False`` (the official models) they do.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from focalnet_pl.cli import FocalNetCLI
from test_mask2former import _panoptic_tree, tiny_mask2former

#: (height, width) of the images: four different sizes after the 64..128 test resize (and 32-padding)
SHAPES = ((64, 80), (64, 128), (112, 64), (64, 64))
TINY_FOCALNET = {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0, "WEIGHTS": ""}
CATEGORIES = [(1, "red"), (3, "blue")]


@pytest.fixture(scope="module")
def coco_sizes(tmp_path_factory) -> Path:
    from conftest import write_coco_dataset

    return write_coco_dataset(tmp_path_factory.mktemp("coco_sizes"), CATEGORIES, sizes=(2, 4), shapes=SHAPES)


def trained_like(task, path: Path, seed: int = 0, scale: float = 0.05) -> str:
    """``task``'s model with every parameter perturbed (no zero-initialised head left), saved to ``path``."""
    generator = torch.Generator().manual_seed(seed)
    state = task.model.state_dict()
    for name, _ in task.model.named_parameters():
        state[name] = state[name] + scale * torch.randn(state[name].shape, generator=generator)
    torch.save(state, path)
    return str(path)


def evaluate(config: Path, batch_size: int, root: Path) -> tuple[dict[str, float], list]:
    """``cli.py test`` on every image at ``eval_batch_size``, in float32 (bf16 rounding differs with the batch
    shapes): its metrics and the detections json (none for segmentation)."""
    cli = FocalNetCLI(args=["test", "--config", str(config), "--data.init_args.eval_batch_size", str(batch_size),
                            "--trainer.default_root_dir", str(root), "--trainer.limit_test_batches", "1.0",
                            "--trainer.precision", "32-true"])
    metrics = {name: float(value) for name, value in cli.trainer.callback_metrics.items()}
    results = sorted(root.rglob("test_*.json"))
    return metrics, json.loads(results[0].read_text()) if results else []


def assert_same_detections(single: list[dict], batched: list[dict]) -> None:
    key = lambda d: (d["image_id"], -d["score"])  # noqa: E731
    single, batched = sorted(single, key=key), sorted(batched, key=key)
    assert len(single) == len(batched) and {d["image_id"] for d in single} == {1, 2, 3, 4}
    for a, b in zip(single, batched):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-2)


def detection_config(small_cli_config, coco: Path, tmp_path: Path, name: str, model: dict,
                     mask_padding: bool) -> Path:
    """The shipped config ``name`` with a tiny trained-like model, evaluated against pseudo ground truth: the
    top 3 detections of each image alone, shifted by a tenth of their size (a random model scores AP 0 on
    the real boxes, which would hide any difference)."""
    from focalnet_pl.tasks.detection import DetectionTask

    overrides = {"FOCALNET": TINY_FOCALNET, "MASK_PADDING": mask_padding, **model}
    config_file = small_cli_config(name, coco, overrides)
    config = yaml.safe_load(config_file.read_text())
    detectron2 = config["model"]["init_args"]["detectron2"]
    detectron2["MODEL"]["WEIGHTS"] = trained_like(DetectionTask(detectron2=detectron2), tmp_path / "weights.pth")
    data = config["data"]["init_args"]
    data.update(test_min_size=64, test_max_size=128)
    config_file.write_text(yaml.safe_dump(config))

    _, detections = evaluate(config_file, 1, tmp_path / "reference")
    dataset = json.loads(Path(data["val_json"]).read_text())
    dataset["annotations"] = []
    for image in dataset["images"]:
        own = sorted((d for d in detections if d["image_id"] == image["id"]), key=lambda d: -d["score"])[:3]
        for detection in own:
            x, y, w, h = detection["bbox"]
            x, y = x + 0.1 * w, y + 0.1 * h
            dataset["annotations"].append({
                "id": len(dataset["annotations"]) + 1, "image_id": image["id"], "category_id": detection["category_id"],
                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
            })
    data["val_json"] = str(tmp_path / "pseudo_val.json")
    Path(data["val_json"]).write_text(json.dumps(dataset))
    config_file.write_text(yaml.safe_dump(config))
    return config_file


DINO = {"DINO": {"NUM_CLASSES": 2, "HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2,
                 "DIM_FEEDFORWARD": 64, "NUM_QUERIES": 30, "DN_NUMBER": 10, "NUM_SELECT": 20}}
MASK_RCNN = {"FPN": {"OUT_CHANNELS": 32}, "ROI_HEADS": {"NUM_CLASSES": 2, "SCORE_THRESH_TEST": 0.0},
             "ROI_BOX_HEAD": {"FC_DIM": 32}, "ROI_MASK_HEAD": {"CONV_DIM": 16},
             "RPN": {"PRE_NMS_TOPK_TEST": 200, "POST_NMS_TOPK_TEST": 50}}


@pytest.mark.parametrize("name, model", [("dino_focalnet_t", DINO), ("mask_rcnn_focalnet_t_srf_1x", MASK_RCNN)],
                         ids=["dino", "mask_rcnn"])
def test_detection_results_do_not_depend_on_the_eval_batch_size(name, model, coco_sizes, small_cli_config, tmp_path,
                                                                 one_thread):
    config = detection_config(small_cli_config, coco_sizes, tmp_path, name, model, mask_padding=True)
    single, single_detections = evaluate(config, 1, tmp_path / "batch1")
    batched, batched_detections = evaluate(config, 4, tmp_path / "batch4")
    assert_same_detections(single_detections, batched_detections)
    assert single["test/AP50"] > 0.2 and single == pytest.approx(batched, abs=1e-6)


def test_unmasked_mask_rcnn_depends_on_the_batch(coco_sizes, small_cli_config, tmp_path, one_thread):
    """The official behaviour (``MODEL.MASK_PADDING False``): the padding changes the detections."""
    config = detection_config(small_cli_config, coco_sizes, tmp_path, "mask_rcnn_focalnet_t_srf_1x", MASK_RCNN,
                              mask_padding=False)
    single, single_detections = evaluate(config, 1, tmp_path / "batch1")
    batched, batched_detections = evaluate(config, 4, tmp_path / "batch4")
    with pytest.raises(AssertionError):
        assert_same_detections(single_detections, batched_detections)
    assert single["test/AP"] != pytest.approx(batched["test/AP"], abs=1e-3)


def mask2former_config(tmp_path: Path, mask_padding: bool) -> Path:
    """The shipped COCO panoptic config with a tiny trained-like model, on images of four sizes."""
    from focalnet_pl.tasks.segmentation import SegmentationTask

    config = yaml.safe_load((Path(__file__).parents[1] / "configs" / "mask2former_focalnet_t_coco_panoptic.yaml").read_text())
    detectron2 = config["model"]["init_args"]["detectron2"]
    tiny = tiny_mask2former(2, [0])["MODEL"]
    for key in ("SEM_SEG_HEAD", "MASK_FORMER"):
        detectron2["MODEL"][key].update(tiny[key])
    detectron2["MODEL"]["FOCALNET"].update(TINY_FOCALNET)
    detectron2["MODEL"]["MASK_FORMER"]["TEST"].update(OBJECT_MASK_THRESHOLD=0.3, OVERLAP_THRESHOLD=0.3)
    detectron2["MODEL"]["MASK_PADDING"] = mask_padding
    detectron2["MODEL"]["WEIGHTS"] = trained_like(SegmentationTask(detectron2=detectron2), tmp_path / "weights.pth",
                                                  scale=0.3)
    _panoptic_tree(tmp_path, "coco", shapes=[(40, 40), (40, 72), (72, 40), (40, 100)])
    config["data"]["init_args"].update(root=str(tmp_path), demo=False, test_size=40, test_max_size=100, num_workers=0)
    config["trainer"] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False,
                         "enable_model_summary": False}
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    return config_file


@pytest.mark.parametrize("mask_padding", [True, False], ids=["masked", "official"])
def test_mask2former_results_do_not_depend_on_the_eval_batch_size(mask_padding, tmp_path, one_thread):
    config = mask2former_config(tmp_path, mask_padding)
    single, _ = evaluate(config, 1, tmp_path / "batch1")
    batched, _ = evaluate(config, 4, tmp_path / "batch4")
    assert {"test/PQ", "test/mIoU", "test/segm_AP"} <= set(single)
    if mask_padding:
        assert single["test/PQ"] > 5 and single["test/mIoU"] > 5 and single == pytest.approx(batched, abs=1e-6)
    else:  # the official model: the padding changes the segments
        assert single["test/mIoU"] != pytest.approx(batched["test/mIoU"], abs=0.1)


def test_focalnet_features_of_a_padded_batch_equal_each_image_alone():
    """With a padding mask, the dense FocalNet features of each image of a padded batch are those of the image
    alone (unpadded, no mask), on the plain and the CPU fast-path forward, with both patch embeddings."""
    from focalnet_pl import cpu_fastpath
    from focalnet_pl.focalnet import create_focalnet
    from focalnet_pl.layers import padding_mask

    generator = torch.Generator().manual_seed(0)
    sizes = [(37, 53), (64, 40)]
    images = [torch.randn(3, h, w, generator=generator) for h, w in sizes]
    batch = torch.zeros(2, 3, 96, 72)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[1], : image.shape[2]] = image
    for conv_embed in (False, True):
        model = create_focalnet("focalnet_tiny_srf", features_only=True, embed_dim=16, depths=(1, 1, 2, 1),
                                use_conv_embed=conv_embed).eval()
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        for mode in ("off", "on"):
            previous = cpu_fastpath.set_mode(mode)
            try:
                with torch.no_grad():
                    batched = model(batch, padding_mask(sizes, 96, 72))
                    unmasked = model(batch)
                    for index, image in enumerate(images):
                        unmasked_error = 0.0
                        for alone, padded, plain in zip(model(image[None]), batched, unmasked):
                            height, width = alone.shape[-2:]
                            torch.testing.assert_close(padded[index, :, :height, :width], alone[0], atol=2e-5, rtol=0)
                            assert (padded[index, :, height:] == 0).all() and (padded[index, :, :, width:] == 0).all()
                            unmasked_error = max(unmasked_error, (plain[index, :, :height, :width] - alone[0]).abs().max())
                        assert unmasked_error > 0.01  # without the mask the padding changes the features
            finally:
                cpu_fastpath.set_mode(previous)


def test_padding_helpers_equal_the_plain_ops_on_the_valid_region():
    from focalnet_pl.layers import masked_group_norm, padding_mask, replicate_padding

    generator = torch.Generator().manual_seed(0)
    norm = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    sizes = [(5, 7), (9, 4)]
    batch = torch.randn(2, 8, 9, 7, generator=generator)
    mask = padding_mask(sizes, 9, 7)
    normalized = masked_group_norm(batch, norm, mask)
    bf16 = masked_group_norm(batch.bfloat16(), norm, mask)
    upsampled = torch.nn.functional.interpolate(replicate_padding(batch, mask), scale_factor=2, mode="bilinear")
    for index, (h, w) in enumerate(sizes):
        alone = batch[index : index + 1, :, :h, :w]
        torch.testing.assert_close(normalized[index, :, :h, :w], norm(alone)[0], atol=1e-5, rtol=0)
        assert bf16.dtype == torch.bfloat16
        torch.testing.assert_close(bf16[index, :, :h, :w].float(), norm(alone.bfloat16().float())[0], atol=0.05, rtol=0)
        # bilinear upsampling near the image's edge reads the border (as on the unpadded map), not the padding
        expected = torch.nn.functional.interpolate(alone, scale_factor=2, mode="bilinear")[0]
        torch.testing.assert_close(upsampled[index, :, : 2 * h, : 2 * w], expected, atol=1e-6, rtol=0)

"""PQ/SQ/RQ and mIoU on hand-made cases (arithmetic in the comments), against panopticapi's pq_compute and
detectron2's SemSegEvaluator (golden values in tests/fixtures), against torchmetrics, and under DDP; one
evaluation stage run by :class:`~focalnet_pl.evaluation.EvaluationRun`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from detectron2.data import Metadata

from focalnet_pl.evaluation import EvaluationRun
from focalnet_pl.evaluation.panoptic import PanopticQualityEvaluator, panoptic_image_statistics
from focalnet_pl.evaluation.semantic import SemanticSegmentationEvaluator

THING, STUFF = 1, 2


def _two_halves_case() -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    gt = np.zeros((10, 10), np.int64)
    gt[:, :5] = 1  # thing, 50 px
    gt[:, 5:] = 2  # stuff, 50 px
    pred = np.zeros((10, 10), np.int64)
    pred[:, :4] = 7  # thing, 40 px
    pred[:, 4:] = 8  # stuff, 60 px
    gt_segments = [{"id": 1, "category_id": THING, "iscrowd": 0}, {"id": 2, "category_id": STUFF, "iscrowd": 0}]
    pred_segments = [{"id": 7, "category_id": THING}, {"id": 8, "category_id": STUFF}]
    return pred, pred_segments, gt, gt_segments


def test_pq_two_halves_by_hand() -> None:
    # thing: |pred 7 & gt 1| = 40, union = 40 + 50 - 40 = 50 -> IoU 0.8, TP; PQ = SQ = 0.8, RQ = 1
    # stuff: |pred 8 & gt 2| = 50, union = 60 + 50 - 50 = 60 -> IoU 5/6, TP; PQ = SQ = 0.8333
    # all: PQ = (0.8 + 0.8333) / 2 = 0.81667
    evaluator = PanopticQualityEvaluator(category_ids=[THING, STUFF], thing_ids=[THING])
    evaluator.update("a", *_two_halves_case())
    result = evaluator.evaluate()
    assert result["PQ_th"] == pytest.approx(80.0)
    assert result["RQ_th"] == pytest.approx(100.0)
    assert result["PQ_st"] == pytest.approx(100 * 5 / 6)
    assert result["PQ"] == pytest.approx(100 * (0.8 + 5 / 6) / 2)
    assert result["SQ"] == pytest.approx(result["PQ"])


def test_pq_void_crowd_false_positive_false_negative_by_hand() -> None:
    gt = np.zeros((10, 10), np.int64)  # rows 0-1: void (20 px)
    gt[2:6, :5] = 1  # thing, 20 px
    gt[2:6, 5:] = 2  # thing, crowd, 20 px
    gt[6:, :] = 3  # stuff, 40 px
    gt_segments = [
        {"id": 1, "category_id": THING, "iscrowd": 0},
        {"id": 2, "category_id": THING, "iscrowd": 1},
        {"id": 3, "category_id": STUFF, "iscrowd": 0},
    ]
    pred = np.zeros((10, 10), np.int64)
    pred[:6, :5] = 11  # thing, 30 px: 20 on gt 1, 10 on void
    pred[2:6, 5:] = 12  # thing, 20 px entirely on the crowd region of its category
    pred[6:, :4] = 13  # stuff, 16 px on gt 3
    pred[6:, 4:] = 14  # thing, 24 px on gt 3 (other category)
    pred_segments = [{"id": i, "category_id": c} for i, c in ((11, THING), (12, THING), (13, STUFF), (14, THING))]
    stats = panoptic_image_statistics(pred, pred_segments, gt, gt_segments)
    # pred 11 vs gt 1: inter 20, union = 30 + 20 - 20 - 10 (void part of pred) = 20 -> IoU 1.0 -> TP
    # pred 12: only on crowd of its own category -> neither matched nor a false positive
    # pred 13 vs gt 3: inter 16, union = 16 + 40 - 16 = 40 -> IoU 0.4 -> gt 3 is FN, pred 13 is FP
    # pred 14: category differs from gt 3, no void/crowd below it -> FP (thing)
    assert (stats[THING].tp, stats[THING].fp, stats[THING].fn) == (1, 1, 0)
    assert stats[THING].iou == pytest.approx(1.0)
    assert (stats[STUFF].tp, stats[STUFF].fp, stats[STUFF].fn) == (0, 1, 1)
    evaluator = PanopticQualityEvaluator(category_ids=[THING, STUFF], thing_ids=[THING])
    evaluator.update(0, pred, pred_segments, gt, gt_segments)
    result = evaluator.evaluate()
    # thing: PQ = 1.0 / (1 + 0.5 * 1 + 0.5 * 0) = 2/3, SQ = 1, RQ = 2/3; stuff: 0 / (0 + 0.5 + 0.5) = 0
    assert result["PQ_th"] == pytest.approx(200 / 3)
    assert result["SQ_th"] == pytest.approx(100.0)
    assert result["PQ_st"] == pytest.approx(0.0)
    assert result["PQ"] == pytest.approx(100 / 3)
    assert result["SQ"] == pytest.approx(50.0)  # (1 + 0) / 2


def test_pq_unlisted_segment_id_is_an_error() -> None:
    pred, pred_segments, gt, gt_segments = _two_halves_case()
    with pytest.raises(ValueError, match="img7.*ground truth segment ids \\[2\\]"):
        panoptic_image_statistics(pred, pred_segments, gt, gt_segments[:1], image_name="img7")


def _random_panoptic(generator: torch.Generator, height: int = 24, width: int = 24):
    """A random panoptic map: stuff categories 3, 4 (one segment each) and thing categories 1, 2 as boxes."""
    category = torch.where(torch.rand(height, width, generator=generator) > 0.5, 3, 4)
    instance = torch.zeros(height, width, dtype=torch.long)
    for index in range(int(torch.randint(1, 4, (1,), generator=generator))):
        top, left = torch.randint(0, height - 6, (2,), generator=generator).tolist()
        size = int(torch.randint(4, 10, (1,), generator=generator))
        category[top : top + size, left : left + size] = 1 + index % 2
        instance[top : top + size, left : left + size] = index + 1
    return category, instance


def _to_ids(category: torch.Tensor, instance: torch.Tensor) -> tuple[np.ndarray, list[dict]]:
    codes = (category * 1000 + instance).numpy()
    ids = np.zeros(codes.shape, np.int64)
    segments = []
    for segment_id, code in enumerate(np.unique(codes), start=1):
        ids[codes == code] = segment_id
        segments.append({"id": segment_id, "category_id": int(code // 1000), "iscrowd": 0})
    return ids, segments


def test_pq_matches_torchmetrics_on_random_maps() -> None:
    from torchmetrics.detection import PanopticQuality  # imported here: the DDP workers re-import this module

    generator = torch.Generator().manual_seed(0)
    reference = PanopticQuality(things={1, 2}, stuffs={3, 4}, return_sq_and_rq=True)
    ours = PanopticQualityEvaluator(category_ids=[1, 2, 3, 4], thing_ids=[1, 2])
    for image_index in range(6):
        gt_category, gt_instance = _random_panoptic(generator)
        pred_category, pred_instance = gt_category.clone(), gt_instance.clone()
        if image_index % 2:  # perturb: shift the prediction by a few pixels
            pred_category, pred_instance = (torch.roll(t, shifts=(2, 3), dims=(0, 1)) for t in (gt_category, gt_instance))
        reference.update(
            torch.stack([pred_category, pred_instance], -1)[None], torch.stack([gt_category, gt_instance], -1)[None]
        )
        ours.update(image_index, *_to_ids(pred_category, pred_instance), *_to_ids(gt_category, gt_instance))
    pq, sq, rq = (100 * float(v) for v in reference.compute())
    result = ours.evaluate()
    assert 0 < result["PQ"] < 100
    assert result["PQ"] == pytest.approx(pq, abs=1e-4)
    assert result["SQ"] == pytest.approx(sq, abs=1e-4)
    assert result["RQ"] == pytest.approx(rq, abs=1e-4)


def test_miou_by_hand() -> None:
    evaluator = SemanticSegmentationEvaluator(num_classes=4, ignore_index=255)
    label = torch.tensor([[0, 0, 1, 255, 1]])
    prediction = torch.tensor([[0, 1, 1, 0, 3]])
    evaluator.update("x", prediction, label)
    result = evaluator.evaluate()
    # ignored pixel dropped; class 0: tp 1, label 2, pred 1 -> 1 / (2 + 1 - 1) = 1/2
    # class 1: tp 1, label 2, pred 2 -> 1 / 3; class 2 absent everywhere -> excluded; class 3 is only
    # predicted, never labelled -> excluded as by detectron2's SemSegEvaluator (its false positive still
    # counts in the union of class 1, whose pixel it took)
    assert result["mIoU"] == pytest.approx(100 * (1 / 2 + 1 / 3) / 2)
    assert result["pACC"] == pytest.approx(50.0)  # 2 of 4 counted pixels right
    assert result["mACC"] == pytest.approx(50.0)  # class 0: 1/2, class 1: 1/2


def test_miou_matches_torchmetrics_and_dedups_image_ids() -> None:
    from torchmetrics.classification import MulticlassJaccardIndex

    generator = torch.Generator().manual_seed(1)
    reference = MulticlassJaccardIndex(num_classes=6, average="macro", ignore_index=255)
    evaluator = SemanticSegmentationEvaluator(num_classes=6)
    for image_index in range(5):
        label = torch.randint(0, 6, (17, 23), generator=generator)
        label[torch.rand(17, 23, generator=generator) < 0.2] = 255
        prediction = torch.where(torch.rand(17, 23, generator=generator) < 0.6, label.clamp(max=5), 2)
        reference.update(prediction[None], label[None])
        evaluator.update(image_index, prediction, label)
    evaluator.update(4, prediction, label)  # the same image id again (DistributedSampler padding)
    assert evaluator.evaluate()["mIoU"] == pytest.approx(100 * float(reference.compute()), abs=1e-4)


def test_miou_rejects_out_of_range_labels() -> None:
    evaluator = SemanticSegmentationEvaluator(num_classes=3)
    with pytest.raises(ValueError, match="img-9.*label values \\[7\\]"):
        evaluator.update("img-9", torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 255]]))


def _ddp_worker(rank: int, world_size: int, port: int, results: mp.Queue) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    pred, pred_segments, gt, gt_segments = _two_halves_case()
    panoptic = PanopticQualityEvaluator(category_ids=[THING, STUFF], thing_ids=[THING])
    semantic = SemanticSegmentationEvaluator(num_classes=2)
    # rank 0 sees images a, b; rank 1 sees b (padding duplicate) and c: 3 distinct images
    for image_id in (["a", "b"] if rank == 0 else ["b", "c"]):
        perfect = image_id == "c"
        panoptic.update(image_id, gt if perfect else pred, gt_segments if perfect else pred_segments, gt, gt_segments)
        semantic.update(image_id, torch.tensor([[0, 1]]), torch.tensor([[0, 1 if perfect else 0]]))
    results.put((rank, panoptic.evaluate(), semantic.evaluate()))
    dist.destroy_process_group()


@pytest.mark.slow
def test_metrics_gather_across_ranks_and_count_each_image_once() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.spawn(_ddp_worker, args=(2, port, results), nprocs=2, join=True)
    outputs = [results.get(timeout=30) for _ in range(2)]
    for _, panoptic, semantic in outputs:
        # things: images a, b IoU 0.8, image c IoU 1 -> SQ = 2.6 / 3; all TP so PQ = SQ
        assert panoptic["PQ_th"] == pytest.approx(100 * 2.6 / 3)
        # stuff: 5/6, 5/6, 1
        assert panoptic["PQ_st"] == pytest.approx(100 * (5 / 6 + 5 / 6 + 1) / 3)
        # semantic: a, b: (0->0, 0->1), c: (0->0, 1->1): class 0: tp 3, label 5, pred 3 -> 3/5; class 1: 1/3
        assert semantic["mIoU"] == pytest.approx(100 * (3 / 5 + 1 / 3) / 2)


# ---- against the reference implementations (tests/fixtures, scripts/make_mask2former_fixtures.py) ---------
METRICS_FIXTURE = Path(__file__).parent / "fixtures" / "segmentation_metrics.pt"


@pytest.fixture(scope="module")
def reference() -> dict:
    return torch.load(METRICS_FIXTURE, weights_only=True)


def _pq_of_set(reference: dict, style: str, keep_areas: bool = True) -> dict[str, float]:
    categories = reference["panoptic_categories"]
    evaluator = PanopticQualityEvaluator(range(len(categories)), [i for i, c in enumerate(categories) if c["isthing"]])
    for image_id, image in enumerate(reference["panoptic_sets"][style]["images"]):
        gt_segments = [s if keep_areas else {k: v for k, v in s.items() if k != "area"} for s in image["gt_segments"]]
        evaluator.update(image_id, image["pred"], image["pred_segments"], image["gt"], gt_segments)
    return evaluator.evaluate()


@pytest.mark.parametrize("style", ["coco", "ade"])
def test_pq_equals_panopticapi(reference: dict, style: str) -> None:
    """COCO-style and ADE-style sets: crowds, void, several crowd segments of one class listed out of id
    order, and (ADE) json areas taken before things were pasted and listed segments without pixels."""
    ours = _pq_of_set(reference, style)
    for suffix, expected in reference["panoptic_sets"][style]["panopticapi"].items():
        for name in ("pq", "sq", "rq"):
            assert ours[f"{name.upper()}{suffix}"] == pytest.approx(100 * expected[name], abs=1e-9), (suffix, name)
        assert ours[f"num_categories{suffix}"] == expected["n"]
    if style == "ade":  # the json areas matter: counted from the PNG, stuff would score otherwise
        assert _pq_of_set(reference, style, keep_areas=False)["PQ_st"] != pytest.approx(ours["PQ_st"], abs=1e-6)


def test_miou_equals_detectron2(reference: dict) -> None:
    """A class that is only predicted ("lamp") is no part of the means, as in detectron2's SemSegEvaluator."""
    semantic = reference["semantic"]
    evaluator = SemanticSegmentationEvaluator(num_classes=len(semantic["classes"]), class_names=semantic["classes"])
    for image_id, (label, prediction) in enumerate(zip(semantic["labels"], semantic["predictions"])):
        evaluator.update(image_id, prediction, label)
    result = evaluator.evaluate()
    for name, expected in semantic["detectron2"].items():
        assert result[name] == pytest.approx(expected, abs=1e-9), name
    assert "IoU-lamp" not in result and result["IoU-person"] == 0.0


def test_pq_listed_empty_segments_and_crowd_order_by_hand() -> None:
    gt = np.zeros((4, 8), np.int64)
    gt[:, :4] = 1  # thing, 16 px
    gt[:2, 4:] = 2  # crowd of THING, listed first
    gt[2:, 4:] = 3  # crowd of THING, listed last
    gt_segments = [
        {"id": 1, "category_id": THING, "iscrowd": 0},
        {"id": 9, "category_id": THING, "iscrowd": 0},  # listed, no pixels: a false negative
        {"id": 2, "category_id": THING, "iscrowd": 1},
        {"id": 3, "category_id": THING, "iscrowd": 1},
    ]
    pred = gt.copy()
    pred[gt == 2] = 7  # on the first-listed crowd: only the last-listed one is ignored -> false positive
    pred[gt == 3] = 8  # on the last-listed crowd: ignored
    pred_segments = [{"id": 1, "category_id": THING}, {"id": 7, "category_id": THING}, {"id": 8, "category_id": THING}]
    stats = panoptic_image_statistics(pred, pred_segments, gt, gt_segments)
    assert (stats[THING].tp, stats[THING].fp, stats[THING].fn) == (1, 1, 1)
    with pytest.raises(ValueError, match=r"predicted segments \[5\] are listed but have no pixels"):
        panoptic_image_statistics(pred, [*pred_segments, {"id": 5, "category_id": THING}], gt, gt_segments)


class _SemanticData:
    """The two members of a datamodule that an :class:`EvaluationRun` reads, for a 2-class semantic split."""

    def dataset_metadata(self, split: str) -> Metadata:
        return Metadata(name=f"toy_{split}", evaluator_type="semantic", stuff_classes=["sky", "road"], ignore_label=255)

    def instance_ground_truth(self, split: str) -> dict:
        raise AssertionError("semantic data has no instances to score")


def test_evaluation_run_scores_a_stage_and_writes_its_metrics(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = EvaluationRun({"sem_seg"})
    with pytest.raises(ValueError, match="val needs a datamodule"):
        run.start("val", None, tmp_path)
    with pytest.raises(RuntimeError, match="before start"):
        run.process([], [])
    run.start("val", _SemanticData(), tmp_path, epoch=3)
    scores = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 1.0], [1.0, 1.0]]])  # argmax: [[0, 1], [1, 1]]
    run.process([{"image_id": 1, "sem_seg_gt": torch.tensor([[0, 1], [0, 255]])}], [{"sem_seg": scores}])
    logged = run.finish(write=True)
    # sky: tp 1, label 2, pred 1 -> 1/2; road: tp 1, label 1, pred 2 -> 1/2
    assert logged["val/mIoU"] == pytest.approx(50.0) and all(name.startswith("val/") for name in logged)
    written = json.loads((tmp_path / "val_metrics.json").read_text())
    assert written["mIoU"] == pytest.approx(50.0) and "IoU-sky" in written  # every metric, per class too
    assert "val (epoch 3):" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="before start"):
        run.finish()  # one finish per start
    run.start("test", _SemanticData(), tmp_path / "quiet")
    run.process([{"image_id": 2, "sem_seg_gt": torch.tensor([[1]])}], [{"sem_seg": torch.tensor([[[0.0]], [[1.0]]])}])
    assert run.finish(write=False) == pytest.approx({"test/mIoU": 100.0, "test/fwIoU": 100.0, "test/pACC": 100.0,
                                                     "test/mACC": 100.0})
    assert not (tmp_path / "quiet").exists()  # only the writing rank writes

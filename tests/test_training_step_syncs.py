"""Training steps that keep a GPU busy: one device read per DINO / Mask2Former step (all Hungarian matchings
in one copy), found with :class:`focalnet_pl.profiling.HostSyncAudit` on CPU; batched matching equals
matching each prediction set alone."""
from __future__ import annotations

from pathlib import Path

import torch
from detectron2.modeling import build_model
from scipy.optimize import linear_sum_assignment

from focalnet_pl.d2.config import build_detectron2_cfg
from focalnet_pl.dino import HungarianMatcher
from focalnet_pl.mask2former import HungarianMaskMatcher
from focalnet_pl.matching import indices_to_device
from focalnet_pl.profiling import HostSyncAudit
from helpers import random_boxes, scene, scene_batch, tiny_dino_cfg, tiny_mask2former


THE_ONE_READ = {("cpu", "matching.py", "assign"): 1}  # all cost matrices of the step, copied together


def _device_reads(model, batch, host_side: set[tuple[str, str]]) -> dict:
    """Reads in a training step, but for those in ``host_side`` functions ``(file, function)``, which read
    tensors that stay on the host on a GPU too."""
    torch.set_num_threads(1)
    model(batch)  # warm-up: first-call work is not per-step work
    with HostSyncAudit() as audit:
        sum(model(batch).values()).backward()
    return {(read.kind, read.file, read.function): count for read, count in audit.reads.items()
            if (read.file, read.function) not in host_side}


def test_dino_step_reads_the_device_once():
    torch.manual_seed(0)
    model = build_model(tiny_dino_cfg())
    batch = [scene([(8, 10, 30, 40), (40, 36, 60, 60)], [0, 1]), scene([(20, 6, 52, 26)], [1]), scene([], [])]
    # the loader's labels (range check) and detectron2's ImageList shape tensors stay on the host
    reads = _device_reads(model, batch, {("dino.py", "prepare_targets"), ("dino.py", "preprocess_image")})
    assert reads == THE_ONE_READ, reads


def test_mask2former_step_reads_the_device_once():
    torch.manual_seed(0)
    model = build_model(build_detectron2_cfg(tiny_mask2former(3, [0])))
    reads = _device_reads(model, scene_batch(), set())
    image_list_shapes = ("aten._local_scalar_dense", "mask2former.py", "forward")  # host shape tensors
    assert reads == THE_ONE_READ | {image_list_shapes: 2}, reads


def test_audit_names_each_kind_of_read_and_its_line():
    x = torch.arange(6.0)
    with HostSyncAudit() as audit:
        x.sum().item()
        x[x > 2].sum()
        if x.max() > 1:
            torch.nonzero(x)
    kinds = {read.kind: read for read in audit.reads}
    assert set(kinds) == {"item", "boolean-mask index", "__bool__", "nonzero"} and audit.total == 4
    assert kinds["item"].file == Path(__file__).name and kinds["item"].function == "test_audit_names_each_kind_of_read_and_its_line"
    assert "item" in audit.table()


def test_dino_matching_all_sets_at_once_equals_each_set_alone():
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher()
    targets = [{"labels": torch.randint(0, 5, (count,), generator=gen), "boxes": random_boxes(count, gen)}
               for count in (3, 0, 6)]
    # three decoder-like sets of 12 queries and an encoder-like set of 9 (stacked in separate groups)
    sets = [(torch.randn(3, queries, 5, generator=gen), random_boxes(3 * queries, gen).view(3, queries, 4))
            for queries in (12, 12, 9, 12)]
    batched = matcher.match_sets(sets, targets)
    for (logits, boxes), per_image in zip(sets, batched):
        for image, (target, (rows, cols)) in enumerate(zip(targets, per_image)):
            if not len(target["labels"]):
                assert rows.numel() == cols.numel() == 0
                continue
            cost = matcher.cost_matrix(logits[image], boxes[image], target["labels"], target["boxes"])
            expected_rows, expected_cols = linear_sum_assignment(cost.numpy())
            assert rows.tolist() == expected_rows.tolist() and cols.tolist() == expected_cols.tolist()


def test_mask2former_matching_all_sets_at_once_equals_each_set_alone():
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMaskMatcher(num_points=64)
    targets = [{"labels": torch.tensor([1, 0, 2]), "masks": torch.rand(3, 16, 16, generator=gen) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16, dtype=torch.bool)}]
    sets = [(torch.randn(2, 5, 4, generator=gen), torch.randn(2, 5, 8, 8, generator=gen)) for _ in range(3)]
    torch.manual_seed(3)
    batched = matcher.match_sets(sets, targets)
    torch.manual_seed(3)
    alone = [matcher(logits, masks, targets) for logits, masks in sets]  # draws its points set by set, alike
    for got, expected in zip(batched, alone):
        assert [(r.tolist(), c.tolist()) for r, c in got] == [(r.tolist(), c.tolist()) for r, c in expected]


def test_indices_to_device_flattens_targets_over_images():
    indices = [[(torch.tensor([4, 7]), torch.tensor([1, 0])), (torch.tensor([2]), torch.tensor([2]))],
               [(torch.tensor([0]), torch.tensor([0])), (torch.tensor([], dtype=torch.int64),) * 2]]
    first, second = indices_to_device(indices, [2, 3], torch.device("cpu"))
    assert [t.tolist() for t in first] == [[0, 0, 1], [4, 7, 2], [1, 0, 4]]  # image 1's target 2 -> flat 2 + 2
    assert [t.tolist() for t in second] == [[0], [0], [0]]


def test_batches_go_to_the_device_without_their_instances():
    from detectron2.structures import Instances

    from datamodules.coco import ListOfDictsDataModule

    record = scene([(8, 10, 30, 40)], [0])
    record["sem_seg"] = torch.zeros(4, 4, dtype=torch.long)
    moved = ListOfDictsDataModule(1, 1, 0).transfer_batch_to_device([record], torch.device("meta"), 0)[0]
    assert moved["image"].device.type == moved["sem_seg"].device.type == "meta"
    assert moved["instances"] is record["instances"] and isinstance(moved["instances"], Instances)
    assert moved["height"] == record["height"]

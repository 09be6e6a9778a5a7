"""DINO: Hungarian matcher, contrastive denoising queries, losses, inference format, a tiny overfit, and a
few steps of every shipped DINO config through the command line."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import pairwise_iou
from torchvision.ops import box_convert, generalized_box_iou

from focalnet_pl.dino import (
    DenoisingMeta,
    HungarianMatcher,
    SetCriterion,
    build_attention_mask,
    focal_class_cost,
    make_denoising_queries,
)
from helpers import random_boxes, scene, tiny_dino_cfg


def test_matcher_equals_brute_force_over_permutations():
    gen = torch.Generator().manual_seed(0)
    matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
    for queries, gts in [(4, 2), (5, 3), (6, 4), (3, 3)]:
        logits = torch.randn(2, queries, 3, generator=gen)
        boxes = random_boxes(2 * queries, gen).view(2, queries, 4)
        targets = [
            {"labels": torch.randint(0, 3, (gts,), generator=gen), "boxes": random_boxes(gts, gen)} for _ in range(2)
        ]
        indices = matcher(logits, boxes, targets)
        for image, (rows, cols) in enumerate(indices):
            labels, target_boxes = targets[image]["labels"], targets[image]["boxes"]
            # the cost by its definition, element by element
            prob = logits[image].sigmoid()
            cost = torch.zeros(queries, gts)
            for q in range(queries):
                for g in range(gts):
                    p = prob[q, labels[g]]
                    class_cost = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-8) - 0.75 * p**2 * -torch.log(1 - p + 1e-8)
                    l1 = (boxes[image, q] - target_boxes[g]).abs().sum()
                    giou = generalized_box_iou(
                        box_convert(boxes[image, q : q + 1], "cxcywh", "xyxy"),
                        box_convert(target_boxes[g : g + 1], "cxcywh", "xyxy"),
                    )[0, 0]
                    cost[q, g] = 2 * class_cost + 5 * l1 - 2 * giou
            best = min(
                sum(cost[perm[g], g].item() for g in range(gts))
                for perm in itertools.permutations(range(queries), gts)
            )
            assert len(rows) == gts and sorted(cols.tolist()) == list(range(gts))
            assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-4)


def test_matcher_handles_empty_targets_and_reports_nan():
    matcher = HungarianMatcher()
    logits, boxes = torch.randn(1, 4, 2), torch.rand(1, 4, 4) * 0.5 + 0.1
    rows, cols = matcher(logits, boxes, [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}])[0]
    assert rows.numel() == cols.numel() == 0
    with pytest.raises(FloatingPointError, match="image 0"):
        matcher(torch.full((1, 4, 2), float("nan")), boxes, [{"labels": torch.tensor([1]), "boxes": boxes[0, :1]}])
    # the focal class cost favours confident correct classes
    cost = focal_class_cost(torch.tensor([[5.0, -5.0], [-5.0, 5.0]]), torch.tensor([0, 1]))
    assert cost[0, 0] < cost[1, 0] and cost[1, 1] < cost[0, 1]


def test_attention_mask_blocks():
    meta = DenoisingMeta(groups=3, max_gt=2, num_gts=[2, 1])
    mask = build_attention_mask(meta, num_queries=5)
    pad = meta.pad_size
    assert pad == 12 and mask.shape == (17, 17)
    # matching queries see each other but none of the denoising queries
    assert mask[pad:, :pad].all() and not mask[pad:, pad:].any()
    for group in range(3):
        rows = slice(4 * group, 4 * group + 4)
        assert not mask[rows, 4 * group : 4 * group + 4].any()  # own group visible
        assert not mask[rows, pad:].any()  # denoising queries may look at matching queries
        others = [g for g in range(3) if g != group]
        for other in others:
            assert mask[rows, 4 * other : 4 * other + 4].all()  # other groups hidden


def test_denoising_queries_layout_and_noise():
    torch.manual_seed(0)
    embedding = torch.nn.Embedding(5, 8)
    boxes0 = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])
    targets = [
        {"labels": torch.tensor([1, 3]), "boxes": boxes0},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)},
    ]
    dn = make_denoising_queries(targets, num_queries=7, num_classes=5, label_embedding=embedding, dn_number=10,
                                label_noise_ratio=0.0, box_noise_scale=0.4)
    meta = dn.meta
    assert (meta.groups, meta.max_gt, meta.num_gts) == (5, 2, [2, 1, 0])
    assert dn.content.shape == (3, 20, 8) and dn.boxes_unsigmoid.shape == (3, 20, 4)
    assert dn.attn_mask.shape == (27, 27)
    boxes = dn.boxes_unsigmoid.sigmoid()
    for group in range(5):
        base = group * 4
        # without label noise the content is the gt label's embedding (positive and negative copies)
        for slot, label in [(base, 1), (base + 1, 3), (base + 2, 1), (base + 3, 3)]:
            assert torch.allclose(dn.content[0, slot], embedding.weight[label])
        assert torch.allclose(dn.content[1, base], embedding.weight[2])
        # padding slots (image 1 has one gt; image 2 none) carry zero content
        assert dn.content[1, base + 1].abs().sum() == 0 and dn.content[2].abs().sum() == 0
        # positives: each corner moved by less than box_noise_scale * half extent; negatives: by 1x to 2x
        for gt in range(2):
            gt_corners = box_convert(boxes0[gt], "cxcywh", "xyxy")
            half = boxes0[gt, 2:].repeat(2) / 2
            pos_shift = (box_convert(boxes[0, base + gt], "cxcywh", "xyxy") - gt_corners).abs()
            neg_shift = (box_convert(boxes[0, base + 2 + gt], "cxcywh", "xyxy") - gt_corners).abs()
            assert (pos_shift <= 0.4 * half + 1e-4).all()
            assert (neg_shift >= 0.4 * half - 1e-4).all() and (neg_shift <= 0.8 * half + 1e-4).all()
    queries, gts = meta.positive_indices(0)
    assert queries.tolist() == [0, 1, 4, 5, 8, 9, 12, 13, 16, 17] and gts.tolist() == [0, 1] * 5

    # label noise flips about label_noise_ratio / 2 of the labels
    many = [{"labels": torch.zeros(50, dtype=torch.long), "boxes": torch.rand(50, 4) * 0.5 + 0.2}]
    noisy = make_denoising_queries(many, 7, 5, embedding, dn_number=100, label_noise_ratio=0.5, box_noise_scale=1.0)
    flipped = ~torch.isclose(noisy.content[0], embedding.weight[0]).all(-1)
    assert 0.1 < flipped.float().mean() < 0.3  # 0.25 * (1 - 1/5) = 0.2 expected

    empty = [{"labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}]
    assert make_denoising_queries(empty, 7, 5, embedding, 10, 0.5, 1.0) is None


def test_criterion_is_zero_for_perfect_predictions_and_weighs_terms():
    matcher = HungarianMatcher()
    criterion = SetCriterion(2, matcher, class_weight=1.0, bbox_weight=5.0, giou_weight=2.0)
    target_boxes = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.6, 0.2, 0.3]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": target_boxes}]
    logits = torch.full((1, 3, 2), -20.0)
    logits[0, 0, 0] = logits[0, 2, 1] = 20.0
    boxes = torch.stack([target_boxes[0], torch.tensor([0.5, 0.5, 0.1, 0.1]), target_boxes[1]])[None]
    losses = criterion({"pred_logits": logits, "pred_boxes": boxes}, [], None, None, None, targets)
    assert set(losses) == {"loss_class", "loss_bbox", "loss_giou"}
    assert all(v.item() < 1e-6 for v in losses.values())
    shifted = boxes.clone()
    shifted[0, 0, 0] += 0.1
    losses = criterion({"pred_logits": logits, "pred_boxes": shifted}, [], None, None, None, targets)
    assert losses["loss_bbox"].item() == pytest.approx(5.0 * 0.1 / 2, rel=1e-4)  # weight * L1 / num_boxes


def test_dino_losses_inference_format_and_variants(one_thread):
    torch.manual_seed(0)
    batch = [scene([(8, 10, 30, 40)], [0]), scene([], [])]
    for overrides in ({}, {"TWO_STAGE": False, "NUM_FEATURE_LEVELS": 4, "IN_FEATURES": ["res2", "res3", "res4", "res5"],
                           "NUM_QUERIES": 5000}):
        model = build_model(tiny_dino_cfg(**overrides))
        losses = model(batch)
        names = {f"loss_{kind}{suffix}" for kind in ("class", "bbox", "giou")
                 for suffix in ["", "_0", "_dn", "_dn_0"] + (["_interm"] if not overrides else [])}
        assert set(losses) == names
        sum(losses.values()).backward()
        assert model.transformer.content_queries.weight.grad is not None
        assert model.label_embedding.weight.grad is not None  # reached through the denoising queries
        # a batch without any gt still gives every loss term (zero for the denoising ones)
        empty_losses = model([scene([], []), scene([], [])])
        assert set(empty_losses) == names and empty_losses["loss_bbox_dn"].item() == 0.0
        model.zero_grad()
        sum(empty_losses.values()).backward()
        assert model.label_embedding.weight.grad is not None  # still in the graph (DDP needs every parameter)

    model.eval()
    resized = dict(batch[0], height=128, width=96)  # the evaluator wants the original image size
    with torch.no_grad():
        outputs = model([resized])
    instances = outputs[0]["instances"]
    assert instances.image_size == (128, 96)
    assert len(instances) <= 10 and {"pred_boxes", "scores", "pred_classes"} <= set(instances.get_fields())
    assert (instances.scores[:-1] >= instances.scores[1:]).all()
    # boxes are the final layer's normalised boxes scaled to the requested size (not clipped, as the official DINO)
    with torch.no_grad():
        out, _ = model.predict([resized])
    flat = out.logits[-1][0].sigmoid().flatten().topk(len(instances)).indices
    queries = flat // out.logits[-1].shape[-1]
    expected = box_convert(out.boxes[-1][0, queries], "cxcywh", "xyxy") * torch.tensor([96.0, 128.0, 96.0, 128.0])
    torch.testing.assert_close(instances.pred_boxes.tensor, expected)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="IN_FEATURES"):
        build_model(tiny_dino_cfg(IN_FEATURES=["res6"]))
    model = build_model(tiny_dino_cfg())
    bad = scene([(8, 10, 30, 40)], [0])
    bad["instances"].gt_classes = torch.tensor([7])
    with pytest.raises(ValueError, match="NUM_CLASSES=2"):
        model([bad])


def test_tiny_dino_overfits_two_images(one_thread):
    torch.manual_seed(0)
    model = build_model(tiny_dino_cfg())
    batch = [scene([(8, 10, 30, 40), (40, 36, 60, 60)], [0, 1]), scene([(20, 6, 52, 26)], [1])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    history = []
    for _ in range(80):
        loss = sum(model(batch).values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5

    model.eval()
    with torch.no_grad():
        outputs = model(batch)
    for output, inputs in zip(outputs, batch):
        predictions, gts = output["instances"], inputs["instances"]
        for index in range(len(gts)):
            confident = predictions[(predictions.pred_classes == gts.gt_classes[index]) & (predictions.scores > 0.2)]
            assert len(confident) > 0
            assert pairwise_iou(gts.gt_boxes[index : index + 1], confident.pred_boxes).max() > 0.5


def test_official_optimizer_decays_every_parameter():
    """The official DINO optimizer (``param_dict_type='default'``): weight decay on every parameter, the
    backbone at its own learning rate."""
    from focalnet_pl.tasks.detection import DetectionTask

    task = DetectionTask(detectron2={"MODEL": tiny_dino_cfg().MODEL}, lr=1e-4, backbone_lr=1e-5, weight_decay=1e-4,
                         weight_decay_all=True)
    groups = task.parameter_groups()
    assert {g["weight_decay"] for g in groups} == {1e-4}
    names = {n: g for g in groups for n in g["param_names"]}
    assert len(names) == sum(1 for p in task.parameters() if p.requires_grad)
    for name in ("transformer.level_embed", "transformer.decoder_norm.bias", "label_embedding.weight",
                 "transformer.content_queries.weight"):
        assert names[name]["lr"] == pytest.approx(1e-4)
    assert names["backbone.body.layers.0.blocks.0.norm1.bias"]["lr"] == pytest.approx(1e-5)


# ---- every DINO config, a few steps through the command line ---------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", ["dino_focalnet_t", "dino_focalnet_l", "dino_focalnet_l_fl3", "dino_focalnet_h",
                                  "demo/dino_shapes"])
def test_dino_config_trains_and_validates_via_cli(name, small_coco, small_cli_config, tmp_path, one_thread):
    """The shipped config with small widths / images / steps: fit 2 steps + COCO validation through cli.py."""
    from focalnet_pl.cli import main

    config_file = small_cli_config(name, small_coco, {
        # tiny widths: no pretrained backbone (the demo config names the classification demo's export)
        "FOCALNET": {"EMBED_DIM": 16, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0, "WEIGHTS": ""},
        "DINO": {"HIDDEN_DIM": 32, "NHEADS": 4, "ENC_LAYERS": 1, "DEC_LAYERS": 2, "DIM_FEEDFORWARD": 64,
                 "NUM_QUERIES": 30, "DN_NUMBER": 10, "NUM_SELECT": 20},
    })
    main(["fit", "--config", str(config_file)])
    results = sorted(tmp_path.rglob("val_*.json"))
    assert results, f"no COCO results json written under {tmp_path}"
    detections = json.loads(results[0].read_text())
    assert detections and {"image_id", "category_id", "bbox", "score"} <= set(detections[0])

"""The official FocalNet Mask R-CNN layout (mmdetection v2) through ``load_detector_weights``.

The references below compute what each mmdetection module means, written from the published
definitions (mmdet v2: ``necks/fpn.py``, ``anchor/anchor_generator.py``, ``coder/delta_xywh_bbox_coder.py``,
``dense_heads/rpn_head.py``, ``roi_extractors/single_level_roi_extractor.py``,
``bbox_heads/convfc_bbox_head.py``, ``mask_heads/fcn_mask_head.py``), straight from the checkpoint's
tensors; the converted detectron2 model must compute the same features, proposals, boxes and masks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList, Instances
from torchvision.ops import batched_nms, roi_align

from focalnet_pl import load_detector_weights
from focalnet_pl.d2.mmdet_weights import COCO_THING_IDS
from focalnet_pl.weights import CheckpointError
from helpers import RATIOS, mask_rcnn, mmdet_checkpoint

STRIDES = (4, 8, 16, 32, 64)
RPN_STDS, RCNN_STDS = (1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)
IMAGE_SIZES = [(463, 417), (385, 449)]  # odd sizes, padded to one 480 x 480 batch


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- references: what the mmdetection modules compute ------------------------------------------------------
def ref_fpn(bottom_up: list[torch.Tensor], sd: dict) -> list[torch.Tensor]:
    """FPN(num_outs=5, add_extra_convs=False): 1x1 laterals, nearest top-down sum, 3x3 outputs, max-pool P6."""
    laterals = [F.conv2d(x, sd[f"neck.lateral_convs.{i}.conv.weight"], sd[f"neck.lateral_convs.{i}.conv.bias"])
                for i, x in enumerate(bottom_up)]
    for i in range(len(laterals) - 1, 0, -1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    outs = [F.conv2d(x, sd[f"neck.fpn_convs.{i}.conv.weight"], sd[f"neck.fpn_convs.{i}.conv.bias"], padding=1)
            for i, x in enumerate(laterals)]
    return outs + [F.max_pool2d(outs[-1], 1, stride=2)]


def ref_anchors(stride: int, height: int, width: int) -> torch.Tensor:
    """AnchorGenerator(scales=[8], ratios, strides): per location (row-major), per ratio."""
    base = []
    for ratio in RATIOS:
        w, h = stride * 8 / math.sqrt(ratio), stride * 8 * math.sqrt(ratio)
        base.append([-0.5 * w, -0.5 * h, 0.5 * w, 0.5 * h])
    ys, xs = torch.meshgrid(torch.arange(height) * stride, torch.arange(width) * stride, indexing="ij")
    shifts = torch.stack([xs, ys, xs, ys], dim=-1).reshape(-1, 1, 4).float()
    return (shifts + torch.tensor(base)[None]).reshape(-1, 4)


def ref_decode(rois: torch.Tensor, deltas: torch.Tensor, stds, max_shape=None) -> torch.Tensor:
    """DeltaXYWHBBoxCoder.decode (means 0): deltas (..., 4) against rois (..., 4)."""
    d = deltas * torch.tensor(stds)
    max_ratio = abs(math.log(16 / 1000))
    dw, dh = d[..., 2].clamp(-max_ratio, max_ratio), d[..., 3].clamp(-max_ratio, max_ratio)
    px, py = (rois[..., 0] + rois[..., 2]) * 0.5, (rois[..., 1] + rois[..., 3]) * 0.5
    pw, ph = rois[..., 2] - rois[..., 0], rois[..., 3] - rois[..., 1]
    gx, gy, gw, gh = px + pw * d[..., 0], py + ph * d[..., 1], pw * dw.exp(), ph * dh.exp()
    boxes = torch.stack([gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5], dim=-1)
    if max_shape is not None:
        h, w = max_shape
        boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h),
                             boxes[..., 2].clamp(0, w), boxes[..., 3].clamp(0, h)], dim=-1)
    return boxes


def ref_rpn(features: list[torch.Tensor], sd: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """RPNHead on each level: (objectness logits (N, HWA), decoded boxes (N, HWA, 4)), anchors in mmdet order."""
    out = []
    for stride, x in zip(STRIDES, features):
        t = F.relu(F.conv2d(x, sd["rpn_head.rpn_conv.weight"], sd["rpn_head.rpn_conv.bias"], padding=1))
        logits = F.conv2d(t, sd["rpn_head.rpn_cls.weight"], sd["rpn_head.rpn_cls.bias"])
        deltas = F.conv2d(t, sd["rpn_head.rpn_reg.weight"], sd["rpn_head.rpn_reg.bias"])
        n, _, h, w = x.shape
        anchors = ref_anchors(stride, h, w)
        out.append((logits.permute(0, 2, 3, 1).reshape(n, -1),
                    ref_decode(anchors.expand(n, -1, -1), deltas.permute(0, 2, 3, 1).reshape(n, -1, 4), RPN_STDS)))
    return out


def ref_proposals(levels, image_size, pre_nms: int, post_nms: int, image: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RPNHead test: top ``pre_nms`` per level, clip, drop empty, NMS 0.7 within each level, top ``post_nms``."""
    scores, boxes, ids = [], [], []
    for level, (logits, decoded) in enumerate(levels):
        top = logits[image].topk(min(pre_nms, logits.shape[1])).indices
        scores.append(logits[image][top])
        boxes.append(ref_decode_clip(decoded[image][top], image_size))
        ids.append(torch.full_like(top, level))
    scores, boxes, ids = torch.cat(scores), torch.cat(boxes), torch.cat(ids)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    scores, boxes, ids = scores[valid], boxes[valid], ids[valid]
    keep = batched_nms(boxes, scores, ids, 0.7)[:post_nms]
    return boxes[keep], scores[keep]


def ref_decode_clip(boxes: torch.Tensor, image_size) -> torch.Tensor:
    h, w = image_size
    return torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], 1)


def ref_roi_features(features: list[torch.Tensor], boxes: list[torch.Tensor], size: int) -> torch.Tensor:
    """SingleRoIExtractor(RoIAlign(size, sampling_ratio=0, aligned=True), finest_scale=56), strides 4..32."""
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
    scale = ((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])).sqrt()
    levels = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(0, 3).long()
    out = rois.new_zeros(len(rois), features[0].shape[1], size, size)
    for level in range(4):
        index = (levels == level).nonzero().flatten()
        if len(index):
            out[index] = roi_align(features[level], rois[index], size, 1 / STRIDES[level], 0, aligned=True)
    return out


def ref_box_head(pooled: torch.Tensor, sd: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared2FCBBoxHead: flatten, fc-relu-fc-relu; (cls logits (R, K+1) with background last, deltas (R, 4K))."""
    x = F.relu(F.linear(pooled.flatten(1), sd["roi_head.bbox_head.shared_fcs.0.weight"], sd["roi_head.bbox_head.shared_fcs.0.bias"]))
    x = F.relu(F.linear(x, sd["roi_head.bbox_head.shared_fcs.1.weight"], sd["roi_head.bbox_head.shared_fcs.1.bias"]))
    return (F.linear(x, sd["roi_head.bbox_head.fc_cls.weight"], sd["roi_head.bbox_head.fc_cls.bias"]),
            F.linear(x, sd["roi_head.bbox_head.fc_reg.weight"], sd["roi_head.bbox_head.fc_reg.bias"]))


def ref_mask_head(pooled: torch.Tensor, sd: dict) -> torch.Tensor:
    """FCNMaskHead(num_convs=4): 3x3 conv-relu x4, 2x deconv-relu, 1x1 class logits (R, K, 28, 28)."""
    x = pooled
    for i in range(4):
        x = F.relu(F.conv2d(x, sd[f"roi_head.mask_head.convs.{i}.conv.weight"], sd[f"roi_head.mask_head.convs.{i}.conv.bias"], padding=1))
    x = F.relu(F.conv_transpose2d(x, sd["roi_head.mask_head.upsample.weight"], sd["roi_head.mask_head.upsample.bias"], stride=2))
    return F.conv2d(x, sd["roi_head.mask_head.conv_logits.weight"], sd["roi_head.mask_head.conv_logits.bias"])


def ref_detections(features, proposals, image_size, sd, score_thresh: float, max_dets: int):
    """StandardRoIHead.simple_test for given proposals: softmax, per-class boxes clipped, score filter,
    per-class NMS 0.5, top ``max_dets``, then the mask of each detection's class (sigmoid, 28 x 28)."""
    logits, deltas = ref_box_head(ref_roi_features(features, [proposals], 7), sd)
    scores = logits.softmax(-1)[:, :-1]
    num_classes = scores.shape[1]
    boxes = ref_decode(proposals[:, None, :].expand(-1, num_classes, -1), deltas.view(-1, num_classes, 4), RCNN_STDS, image_size)
    keep = (scores > score_thresh).nonzero()
    boxes, scores, labels = boxes[keep[:, 0], keep[:, 1]], scores[keep[:, 0], keep[:, 1]], keep[:, 1]
    kept = batched_nms(boxes, scores, labels, 0.5)[:max_dets]
    boxes, scores, labels = boxes[kept], scores[kept], labels[kept]
    masks = ref_mask_head(ref_roi_features(features, [boxes], 14), sd)
    return boxes, scores, labels, masks[torch.arange(len(labels)), labels].sigmoid()


# ---- helpers ---------------------------------------------------------------------------------------------------
def images_batch(model) -> ImageList:
    generator = torch.Generator().manual_seed(7)
    pictures = [torch.rand(3, h, w, generator=generator) * 255 for h, w in IMAGE_SIZES]
    return ImageList.from_tensors([(p - model.pixel_mean) / model.pixel_std for p in pictures],
                                  model.backbone.size_divisibility)


def random_proposals(image_size, count: int, seed: int) -> torch.Tensor:
    """Boxes of every size (so every FPN level is pooled), inside the image."""
    generator = torch.Generator().manual_seed(seed)
    h, w = image_size
    sizes = torch.exp(torch.empty(count).uniform_(math.log(12), math.log(min(h, w)), generator=generator))
    aspect = torch.exp(torch.empty(count).uniform_(-0.7, 0.7, generator=generator))
    bw, bh = (sizes * aspect).clamp(max=w - 1), (sizes / aspect).clamp(max=h - 1)
    x0 = torch.rand(count, generator=generator) * (w - bw)
    y0 = torch.rand(count, generator=generator) * (h - bh)
    return torch.stack([x0, y0, x0 + bw, y0 + bh], 1)


def close(actual: torch.Tensor, expected: torch.Tensor, name: str, atol: float = 1e-4) -> float:
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert actual.shape == expected.shape and diff <= atol * max(1.0, expected.abs().max().item()), (name, diff)
    return diff


# ---- tests -------------------------------------------------------------------------------------------------------
def test_official_mask_rcnn_checkpoint_computes_what_mmdetection_does(tmp_path):
    checkpoint = mmdet_checkpoint()
    path = tmp_path / "focalnet_tiny_srf_maskrcnn_1x.pth"
    torch.save(checkpoint, path)
    model = mask_rcnn()
    report = load_detector_weights(model, str(path), class_ids=COCO_THING_IDS)
    assert report.layout == "mmdet-mask-rcnn" and not report.problems() and not report.reinitialised
    assert sorted(report.loaded + report.converted) == sorted(model.state_dict())  # every tensor used
    sd = checkpoint["state_dict"]
    assert len(report.loaded) + len(report.converted) == len(sd)

    with torch.no_grad():
        images = images_batch(model)
        bottom_up = model.backbone.bottom_up(images.tensor)
        features = model.backbone(images.tensor)
        # the backbone is the checkpoint's FocalNet, tensor for tensor
        for key, value in model.backbone.bottom_up.body.state_dict().items():
            assert torch.equal(value, sd[f"backbone.{key}"]), key
        # FPN: same P2..P6
        expected = ref_fpn([bottom_up[name] for name in ("res2", "res3", "res4", "res5")], sd)
        levels = [features[f"p{i}"] for i in range(2, 7)]
        for i, (ours, theirs) in enumerate(zip(levels, expected)):
            close(ours, theirs, f"p{i + 2}")

        # RPN: same anchors, objectness and decoded boxes for every anchor (before top-k and NMS) ...
        rpn = model.proposal_generator
        anchors = rpn.anchor_generator(levels)
        logits, deltas = rpn.rpn_head(levels)
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas]
        decoded = rpn._decode_proposals(anchors, deltas)
        reference = ref_rpn(levels, sd)
        for level, (ours_logits, ours_boxes, anchor, (ref_logits, ref_boxes)) in enumerate(zip(logits, decoded, anchors, reference)):
            h, w = levels[level].shape[-2:]
            close(anchor.tensor, ref_anchors(STRIDES[level], h, w), f"anchors {level}")
            close(ours_logits, ref_logits, f"objectness {level}")
            close(ours_boxes, ref_boxes, f"proposal boxes {level}")
        # ... and the same proposals after the per-level top-k and NMS
        proposals, _ = rpn(images, features)
        for image, (instances, size) in enumerate(zip(proposals, images.image_sizes)):
            boxes, scores = ref_proposals(reference, size, 300, 200, image)
            close(instances.proposal_boxes.tensor, boxes, "proposals")
            close(instances.objectness_logits, scores, "proposal logits")

        # box and mask heads on given proposals: same class scores, boxes, detections and masks
        heads = model.roi_heads
        roi_levels = levels[:4]
        given = [random_proposals(size, 60, seed) for seed, size in enumerate(images.image_sizes)]
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(b) for b in given])
        close(pooled, ref_roi_features(roi_levels, given, 7), "box RoIAlign")
        inputs = [Instances(size, proposal_boxes=Boxes(b)) for size, b in zip(images.image_sizes, given)]
        predictions = heads.box_predictor(heads.box_head(pooled))
        ref_logits, ref_deltas = ref_box_head(ref_roi_features(roi_levels, given, 7), sd)
        close(torch.cat(heads.box_predictor.predict_probs(predictions, inputs)), ref_logits.softmax(-1), "class scores")
        ref_boxes = ref_decode(torch.cat(given)[:, None].expand(-1, 80, -1), ref_deltas.view(-1, 80, 4), RCNN_STDS)
        close(torch.cat(heads.box_predictor.predict_boxes(predictions, inputs)), ref_boxes.flatten(1), "class boxes")

        detections, _ = heads(images, features, inputs)
        for image, (instances, size, boxes) in enumerate(zip(detections, images.image_sizes, given)):
            one_image = [x[image : image + 1] for x in roi_levels]
            ref = ref_detections(one_image, boxes, size, sd, score_thresh=0.005, max_dets=30)
            assert len(instances) == len(ref[0]) > 5
            close(instances.pred_boxes.tensor, ref[0], "detection boxes")
            close(instances.scores, ref[1], "detection scores")
            assert torch.equal(instances.pred_classes, ref[2])
            close(instances.pred_masks[:, 0], ref[3], "masks")


def test_class_subset_and_other_delta_weights():
    """A 3-class model picks the checkpoint's rows by COCO id; regressors are rescaled for other
    BBOX_REG_WEIGHTS so that the decoded boxes stay the mmdetection ones."""
    checkpoint = mmdet_checkpoint(seed=1)
    sd = checkpoint["state_dict"]
    ids = [90, 1, 18]  # toothbrush, person, dog: mmdet classes 79, 0, 16
    rows = [COCO_THING_IDS.index(i) for i in ids]
    model = mask_rcnn(num_classes=3, RPN={"BBOX_REG_WEIGHTS": [2.0, 2.0, 0.5, 0.5]},
                      ROI_BOX_HEAD={"BBOX_REG_WEIGHTS": [20.0, 20.0, 10.0, 10.0]})
    report = load_detector_weights(model, checkpoint, class_ids=ids)
    assert not report.problems() and not report.reinitialised
    with torch.no_grad():
        images = images_batch(model)
        features = model.backbone(images.tensor)
        levels = [features[f"p{i}"] for i in range(2, 7)]
        rpn = model.proposal_generator
        anchors = rpn.anchor_generator(levels)
        _, deltas = rpn.rpn_head(levels)
        deltas = [x.view(x.shape[0], -1, 4, x.shape[-2], x.shape[-1]).permute(0, 3, 4, 1, 2).flatten(1, -2) for x in deltas]
        for ours, (_, theirs) in zip(rpn._decode_proposals(anchors, deltas), ref_rpn(levels, sd)):
            close(ours, theirs, "rpn boxes with weights (2, 2, 0.5, 0.5)")

        heads = model.roi_heads
        given = [random_proposals(size, 40, 5 + seed) for seed, size in enumerate(images.image_sizes)]
        inputs = [Instances(size, proposal_boxes=Boxes(b)) for size, b in zip(images.image_sizes, given)]
        pooled = heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(b) for b in given])
        scores, proposal_deltas = heads.box_predictor(heads.box_head(pooled))
        ref_logits, ref_deltas = ref_box_head(ref_roi_features(levels[:4], given, 7), sd)
        close(scores, ref_logits[:, rows + [80]], "selected class logits, background last")
        boxes = torch.cat(heads.box_predictor.predict_boxes((scores, proposal_deltas), inputs)).view(-1, 3, 4)
        expected = ref_decode(torch.cat(given)[:, None].expand(-1, 80, -1), ref_deltas.view(-1, 80, 4), RCNN_STDS)
        close(boxes, expected[:, rows], "selected class boxes with weights (20, 20, 10, 10)")
        masks = heads.mask_head.layers(heads.mask_pooler([features[f] for f in heads.mask_in_features], [Boxes(b) for b in given]))
        close(masks, ref_mask_head(ref_roi_features(levels[:4], given, 14), sd)[:, rows], "selected mask logits")


def test_mask_rcnn_checkpoints_that_do_not_fit_are_refused():
    with pytest.raises(CheckpointError, match=r"anchors of scales \[8\].*MODEL.ANCHOR_GENERATOR.SIZES"):
        load_detector_weights(mask_rcnn(ANCHOR_GENERATOR={"SIZES": [[16], [32], [64], [128], [256]]}), mmdet_checkpoint())
    with pytest.raises(CheckpointError, match=r"wrong_shape \(\d+\): backbone.bottom_up.body.patch_embed.proj.weight "
                                              r"\(checkpoint \(24, 3, 4, 4\) vs model \(16, 3, 4, 4\)\).*"
                                              r"Backbone differs: embed_dim: checkpoint 24, model 16"):
        load_detector_weights(mask_rcnn(), mmdet_checkpoint(width=24))
    box_only = mask_rcnn(MASK_ON=False)
    with pytest.raises(CheckpointError, match=r"unexpected \(12\): roi_heads.mask_head"):
        load_detector_weights(box_only, mmdet_checkpoint())
    with pytest.raises(CheckpointError, match=r"missing \(12\): roi_heads.mask_head"):
        load_detector_weights(mask_rcnn(), mmdet_checkpoint(mask=False))
    # another class set: class rows stay at their initial values, and the report says why
    report = load_detector_weights(mask_rcnn(num_classes=2), mmdet_checkpoint(), class_ids=[1, 200])
    assert sorted(entry.split(":")[0] for entry in report.reinitialised) == [
        "roi_heads.box_predictor.bbox_pred.bias", "roi_heads.box_predictor.bbox_pred.weight",
        "roi_heads.box_predictor.cls_score.bias", "roi_heads.box_predictor.cls_score.weight",
        "roi_heads.mask_head.predictor.bias", "roi_heads.mask_head.predictor.weight"]
    assert "dataset ids [200]" in report.reinitialised[0]

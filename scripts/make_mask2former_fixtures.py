"""Golden fixtures for the Mask2Former and segmentation-metric parity tests, made by the official code.

    python scripts/make_mask2former_fixtures.py --mask2former /tmp/Mask2Former --panopticapi /tmp/panopticapi

``--mask2former``: a checkout of facebookresearch/Mask2Former; ``--panopticapi``: a checkout of
cocodataset/panopticapi (neither is part of this project; both are imported from those paths at run
time). detectron2 must be importable; its compiled ops are not needed: the official deformable
attention runs on its own pure-PyTorch core, substituted here for the CUDA op.

Writes, into ``--out`` (default ``tests/fixtures``):

* ``mask2former_official.pt``: a tiny official ``MaskFormer`` (our FocalNet as its detectron2 backbone,
  every tensor perturbed to trained-like values) as an official-layout checkpoint, our config for the
  same architecture, and for three batches (odd and padded sizes, outputs resized to other sizes) the
  official pixel-decoder features, class and mask logits of every decoder layer, and the semantic
  (both resize orders), panoptic and instance inference results; the official panoptic and instance
  inference of 20 model-like sets of logits at several thresholds; and the learning rate and weight
  decay the official ``train_net.py`` gives each parameter.
* ``segmentation_metrics.pt``: generated COCO-style and ADE-style panoptic sets (crowds, void, several
  crowd segments of one class, json areas that differ from the PNG, listed segments without pixels)
  with panopticapi's ``pq_compute`` results, and a semantic set with detectron2's ``SemSegEvaluator`` results.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import re
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from focalnet_pl.d2.config import add_focalnet_config  # noqa: E402  (also registers the FocalNet backbone)

NUM_CLASSES = 5
THING_CLASSES = [0, 2, 3]
DATASET_NAME = "focalnet_pl_mask2former_fixture"
#: seed of the weights and images (one whose panoptic outputs keep several segments)
MODEL_SEED = 7

# ---- the tiny model, as our config and as the official one ---------------------------------------------------
OUR_CONFIG = {
    "MODEL": {
        "META_ARCHITECTURE": "Mask2Former",
        "DEVICE": "cpu",
        "PIXEL_MEAN": [123.675, 116.28, 103.53],
        "PIXEL_STD": [58.395, 57.12, 57.375],
        "BACKBONE": {"NAME": "build_focalnet_backbone"},
        "FOCALNET": {"VARIANT": "focalnet_tiny_srf", "EMBED_DIM": 8, "DEPTHS": [1, 1, 1, 1], "DROP_PATH_RATE": 0.0},
        "SEM_SEG_HEAD": {
            "NUM_CLASSES": NUM_CLASSES, "IN_FEATURES": ["res2", "res3", "res4", "res5"], "CONVS_DIM": 32,
            "MASK_DIM": 32, "TRANSFORMER_ENC_LAYERS": 2, "DEFORMABLE_NUM_HEADS": 4, "DEFORMABLE_NUM_POINTS": 4,
            # the official pixel decoder's feed-forward width is fixed at 1024
            "DEFORMABLE_DIM_FEEDFORWARD": 1024,
        },
        "MASK_FORMER": {
            "HIDDEN_DIM": 48, "NHEADS": 4, "DIM_FEEDFORWARD": 64, "NUM_OBJECT_QUERIES": 8, "DEC_LAYERS": 3,
            "THING_CLASS_IDS": THING_CLASSES,
            "TEST": {"SEMANTIC_ON": True, "INSTANCE_ON": True, "PANOPTIC_ON": True, "OBJECT_MASK_THRESHOLD": 0.8,
                     "OVERLAP_THRESHOLD": 0.8, "DETECTIONS_PER_IMAGE": 12},
        },
    }
}

#: batches: per image (height, width) of the input and optionally the output size it is resized to
CASES = [
    [((48, 72), None)],
    [((45, 61), (54, 70)), ((38, 70), None)],
    [((53, 41), (61, 47))],
]


def import_official(mask2former_root: Path, panopticapi_root: Path) -> None:
    """Import the official packages; their deformable attention runs on its pure-PyTorch core."""
    # the CUDA extension and detectron2's compiled ops are absent: empty stand-ins let the imports succeed
    sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
    sys.modules.setdefault("detectron2._C", types.ModuleType("detectron2._C"))
    sys.path.insert(0, str(mask2former_root))
    sys.path.insert(0, str(panopticapi_root))
    import mask2former  # noqa: F401  (registers MaskFormer, its heads and datasets)
    from mask2former.modeling.pixel_decoder.ops.functions import ms_deform_attn_func
    from mask2former.modeling.pixel_decoder.ops.modules import ms_deform_attn

    class PyTorchCore:
        @staticmethod
        def apply(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, im2col_step):
            return ms_deform_attn_func.ms_deform_attn_core_pytorch(
                value, spatial_shapes, sampling_locations, attention_weights
            )

    ms_deform_attn.MSDeformAttnFunction = PyTorchCore


def official_cfg():
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.projects.deeplab import add_deeplab_config
    from mask2former import add_maskformer2_config

    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    add_focalnet_config(cfg)
    ours = OUR_CONFIG["MODEL"]
    cfg.MODEL.META_ARCHITECTURE = "MaskFormer"
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.PIXEL_MEAN = ours["PIXEL_MEAN"]
    cfg.MODEL.PIXEL_STD = ours["PIXEL_STD"]
    cfg.MODEL.BACKBONE.NAME = "build_focalnet_backbone"
    for key, value in ours["FOCALNET"].items():
        cfg.MODEL.FOCALNET[key] = value
    head, node = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.MASK_FORMER
    head.NAME = "MaskFormerHead"
    head.NUM_CLASSES = NUM_CLASSES
    head.IN_FEATURES = ours["SEM_SEG_HEAD"]["IN_FEATURES"]
    head.CONVS_DIM = ours["SEM_SEG_HEAD"]["CONVS_DIM"]
    head.MASK_DIM = ours["SEM_SEG_HEAD"]["MASK_DIM"]
    head.NORM = "GN"
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.COMMON_STRIDE = 4
    head.TRANSFORMER_ENC_LAYERS = ours["SEM_SEG_HEAD"]["TRANSFORMER_ENC_LAYERS"]
    node.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    node.TRANSFORMER_IN_FEATURE = "multi_scale_pixel_decoder"
    node.HIDDEN_DIM = ours["MASK_FORMER"]["HIDDEN_DIM"]
    node.NHEADS = ours["MASK_FORMER"]["NHEADS"]  # also the pixel decoder's deformable heads
    node.DIM_FEEDFORWARD = ours["MASK_FORMER"]["DIM_FEEDFORWARD"]
    node.NUM_OBJECT_QUERIES = ours["MASK_FORMER"]["NUM_OBJECT_QUERIES"]
    node.DEC_LAYERS = ours["MASK_FORMER"]["DEC_LAYERS"] + 1  # the official count includes the learned queries
    node.DROPOUT = 0.0
    node.PRE_NORM = False
    node.ENFORCE_INPUT_PROJ = False
    node.SIZE_DIVISIBILITY = 32
    test = ours["MASK_FORMER"]["TEST"]
    node.TEST.SEMANTIC_ON = node.TEST.INSTANCE_ON = node.TEST.PANOPTIC_ON = True
    node.TEST.OBJECT_MASK_THRESHOLD = test["OBJECT_MASK_THRESHOLD"]
    node.TEST.OVERLAP_THRESHOLD = test["OVERLAP_THRESHOLD"]
    cfg.TEST.DETECTIONS_PER_IMAGE = test["DETECTIONS_PER_IMAGE"]
    cfg.DATASETS.TRAIN = (DATASET_NAME,)
    MetadataCatalog.get(DATASET_NAME).set(
        thing_dataset_id_to_contiguous_id={i: i for i in THING_CLASSES},
        stuff_dataset_id_to_contiguous_id={i: i for i in range(NUM_CLASSES)},
    )
    return cfg


#: factors on the perturbed tensors (regex on the name): confident classes, queries that stay distinct
#: through the decoder (each layer refines rather than overwrites them) and masks with spatial contrast
TRAINED_LIKE_FACTORS = {
    r"class_embed": 8.0,
    r"sampling_offsets\.bias": 1.5,
    r"predictor\..*(out_proj|linear2)": 0.2,
    r"query_(feat|embed)": 3.0,
    r"pixel_decoder\.mask_features\.weight|mask_embed\.layers\.2": 3.0,
}


def perturb(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Trained-like weights: every tensor moved off its initial value (zeros, ones and constants too)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            spread = float(param.std()) if param.numel() > 1 else 0.0
            scale = 0.5 * spread if spread > 1e-6 else 0.1
            param.add_(torch.randn(param.shape, generator=generator) * scale)
            for pattern, factor in TRAINED_LIKE_FACTORS.items():
                if re.search(pattern, name):
                    param.mul_(factor)
            param.copy_(param.half().float())  # float16 values: the checkpoint is stored at half the size


def smooth_image(height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """A uint8 (3, H, W) image of blurred blobs (spatial structure the masks can follow)."""
    coarse = torch.rand(1, 3, max(2, height // 12), max(2, width // 12), generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)[0]
    noise = torch.rand(3, height, width, generator=generator) * 0.15
    return ((image + noise).clamp(0, 1) * 255).round().to(torch.uint8)


def run_official(model, batch: list[dict]) -> dict:
    """The official forward with the intermediates it exposes, and its inference results in both
    semantic resize orders (resize first, as with panoptic/instance on; combine first, semantic only)."""
    captured: dict = {}
    decoder = model.sem_seg_head.pixel_decoder
    original = decoder.forward_features

    def forward_features(features):
        mask_features, _, multi_scale = original(features)
        captured["mask_features"] = mask_features.clone()
        captured["multi_scale_features"] = [m.clone() for m in multi_scale]
        return mask_features, _, multi_scale

    decoder.forward_features = forward_features
    hook = model.sem_seg_head.predictor.register_forward_hook(lambda _m, _i, out: captured.update(head=out))
    with torch.no_grad():
        results = model(copy.deepcopy(batch))
        model.panoptic_on = model.instance_on = False
        model.sem_seg_postprocess_before_inference = False
        semantic_only = model(copy.deepcopy(batch))
        model.panoptic_on = model.instance_on = True
        model.sem_seg_postprocess_before_inference = True
    hook.remove()
    decoder.forward_features = original
    head = captured.pop("head")
    layers = [*head["aux_outputs"], {"pred_logits": head["pred_logits"], "pred_masks": head["pred_masks"]}]
    per_image = []
    for result, semantic in zip(results, semantic_only):
        segment_map, segments = result["panoptic_seg"]
        instances = result["instances"]
        per_image.append({
            "sem_seg": result["sem_seg"],
            "sem_seg_combine_first": semantic["sem_seg"],
            "panoptic_seg": segment_map,
            "segments_info": [dict(s) for s in segments],
            "instance_masks": instances.pred_masks.bool(),
            "instance_scores": instances.scores,
            "instance_classes": instances.pred_classes,
        })
    return {
        **captured,
        "pred_logits": [layer["pred_logits"] for layer in layers],
        "pred_masks": [layer["pred_masks"] for layer in layers],
        "results": per_image,
    }


def model_like_logits(generator: torch.Generator, num_queries: int, size: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Class (Q, K + 1) and mask (Q, size, size) logits like a trained model's: blob masks of various sizes
    that overlap, soft backgrounds, some confident queries and some "no object" ones (float16 values)."""
    coordinates = torch.linspace(0, 1, size)
    ys, xs = coordinates[:, None], coordinates[None, :]
    masks = []
    for _ in range(num_queries):
        cy, cx, radius, sharpness, offset = torch.rand(5, generator=generator).tolist()
        distance = ((ys - cy) ** 2 + (xs - cx) ** 2).sqrt()
        texture = torch.nn.functional.interpolate(torch.randn(1, 1, 4, 4, generator=generator), size=(size, size),
                                                  mode="bilinear", align_corners=False)[0, 0]
        masks.append((0.1 + 0.4 * radius - distance) * (5 + 25 * sharpness) + texture + 2 * offset - 1)
    classes = torch.randn(num_queries, NUM_CLASSES + 1, generator=generator)
    winners = torch.randint(0, NUM_CLASSES + 1, (num_queries,), generator=generator)
    classes[torch.arange(num_queries), winners] += 1 + 5 * torch.rand(num_queries, generator=generator)
    return classes.half().float(), torch.stack(masks).half().float()


def make_inference_cases(model, generator: torch.Generator, count: int = 20) -> list[dict]:
    """The official panoptic and instance inference of model-like logits, at several thresholds."""
    cases = []
    for index in range(count):
        class_logits, mask_logits = model_like_logits(generator, model.num_queries)
        model.object_mask_threshold = (0.8, 0.5, 0.3)[index % 3]
        model.overlap_threshold = (0.8, 0.6)[index % 2]
        with torch.no_grad():
            segment_map, segments = model.panoptic_inference(class_logits, mask_logits)
            instances = model.instance_inference(class_logits, mask_logits)
        cases.append({
            "class_logits": class_logits.half(), "mask_logits": mask_logits.half(),
            "object_mask_threshold": model.object_mask_threshold, "overlap_threshold": model.overlap_threshold,
            "panoptic_seg": segment_map.to(torch.uint8), "segments_info": [dict(s) for s in segments],
            "instance_masks": instances.pred_masks.bool(), "instance_scores": instances.scores,
            "instance_classes": instances.pred_classes,
        })
    test = OUR_CONFIG["MODEL"]["MASK_FORMER"]["TEST"]
    model.object_mask_threshold, model.overlap_threshold = test["OBJECT_MASK_THRESHOLD"], test["OVERLAP_THRESHOLD"]
    print(f"inference cases: segments per case {[len(c['segments_info']) for c in cases]}")
    return cases


def official_parameter_groups(mask2former_root: Path, cfg, model) -> dict[str, dict[str, float]]:
    """Learning rate and weight decay of every parameter under the official ``train_net.py``'s
    ``Trainer.build_optimizer`` (base lr 1e-4, weight decay 0.05, backbone x0.1)."""
    spec = importlib.util.spec_from_file_location("mask2former_train_net", mask2former_root / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    cfg = cfg.clone()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY, cfg.SOLVER.BACKBONE_MULTIPLIER = 1e-4, 0.05, 0.1
    optimizer = train_net.Trainer.build_optimizer(cfg, model)
    names = {id(param): name for name, param in model.named_parameters()}
    return {
        names[id(param)]: {"lr": group["lr"], "weight_decay": group["weight_decay"]}
        for group in optimizer.param_groups for param in group["params"]
    }


def make_model_fixture(mask2former_root: Path) -> dict:
    from detectron2.modeling import build_model

    generator = torch.Generator().manual_seed(MODEL_SEED)
    torch.manual_seed(MODEL_SEED)
    cfg = official_cfg()
    model = build_model(cfg).eval()
    perturb(model, generator)
    cases = []
    for case in CASES:
        batch = []
        for (height, width), output_size in case:
            record = {"image": smooth_image(height, width, generator)}
            if output_size is not None:
                record["height"], record["width"] = output_size
            batch.append(record)
        cases.append({"inputs": batch, "outputs": run_official(model, batch)})
        kept = [len(r["segments_info"]) for r in cases[-1]["outputs"]["results"]]
        print(f"case {[size for size, _ in case]}: panoptic segments per image {kept}")
    inference_cases = make_inference_cases(model, generator)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    checkpoint = {"model": state, "__author__": "make_mask2former_fixtures"}
    return {
        "config": OUR_CONFIG, "checkpoint": checkpoint, "cases": cases, "inference_cases": inference_cases,
        "parameter_groups": official_parameter_groups(mask2former_root, cfg, model),
    }


# ---- metrics -----------------------------------------------------------------------------------------------------
PANOPTIC_CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1},
    {"id": 2, "name": "car", "isthing": 1},
    {"id": 5, "name": "dog", "isthing": 1},  # predicted, never in the ground truth
    {"id": 10, "name": "sky", "isthing": 0},
    {"id": 11, "name": "road", "isthing": 0},
    {"id": 12, "name": "grass", "isthing": 0},
]


def _box(ids: np.ndarray, top: int, left: int, height: int, width: int, value: int) -> None:
    ids[top : top + height, left : left + width] = value


def panoptic_image(rng: np.random.Generator, ade_style: bool, index: int) -> tuple[np.ndarray, list[dict], np.ndarray, list[dict]]:
    """One ground truth and one prediction (id maps and segment lists with contiguous ``category_id`` =
    index in :data:`PANOPTIC_CATEGORIES`), covering crowds, void, several crowd segments of a class, and for
    ADE style json areas taken before the things were pasted and listed segments without pixels."""
    height, width = 40, 48
    contiguous = {c["id"]: i for i, c in enumerate(PANOPTIC_CATEGORIES)}
    gt = np.zeros((height, width), np.int64)
    segments: list[dict] = []

    def add(segment_id: int, category: int, crowd: int = 0) -> None:
        segments.append({"id": segment_id, "category_id": contiguous[category], "iscrowd": crowd})

    split = int(rng.integers(12, 22))
    gt[:split] = 100  # sky
    gt[split:] = 101  # road
    _box(gt, split + 4, 30, 10, 18, 102)  # grass
    add(100, 10)
    add(101, 11)
    add(102, 12)
    stuff_areas = {s: int((gt == s).sum()) for s in (100, 101, 102)}
    boxes = []
    for instance in range(int(rng.integers(2, 4))):
        top, left = int(rng.integers(0, height - 10)), int(rng.integers(0, width - 12))
        size = (int(rng.integers(5, 10)), int(rng.integers(6, 12)))
        _box(gt, top, left, *size, 1 + instance)
        add(1 + instance, 1 if instance % 2 == 0 else 2)
        boxes.append((top, left, *size))
    # crowd regions of "person", listed out of id order; a prediction sits on the first listed one
    _box(gt, 0, 0, 6, 10, 60)
    _box(gt, height - 6, width - 10, 6, 10, 50)
    add(60, 1, crowd=1)
    add(50, 1, crowd=1)
    gt[:, :2] = 0  # void column
    gt[int(rng.integers(0, height)), :] = 0  # void row
    if ade_style:
        add(90 + index, 2)  # listed, never painted: a false negative for panopticapi
        for segment in segments:
            if segment["id"] in stuff_areas:  # areas recorded before the things were pasted over the stuff
                segment["area"] = stuff_areas[segment["id"]]
    for segment in segments:
        segment.setdefault("area", int((gt == segment["id"]).sum()))

    # prediction: the ground truth shifted and relabelled a little, plus false positives
    pred = np.roll(gt, shift=(int(rng.integers(-2, 3)), int(rng.integers(-2, 3))), axis=(0, 1)).copy()
    pred[pred == 50] = 0
    pred[pred == 60] = 0
    _box(pred, 0, 0, 5, 9, 7)  # "person" on the first-listed crowd region (not the last): a false positive
    if index == 0:
        _box(pred, height - 5, width - 9, 5, 9, 8)  # "person" on the last-listed crowd region: ignored
    if index % 2:
        pred[pred == 102] = 101  # grass predicted as road: merged into its segment
    pred_segments = []
    for segment_id in np.unique(pred):
        if segment_id == 0:
            continue
        source = next((s for s in segments if s["id"] == segment_id), None)
        category = source["category_id"] if source is not None else contiguous[1]
        if segment_id == 3:
            category = contiguous[5]  # a thing with the wrong class
        pred_segments.append({"id": int(segment_id), "category_id": category})
    if index == 1:
        _box(pred, 20, 10, 6, 6, 9)
        pred_segments.append({"id": 9, "category_id": contiguous[5]})
    return gt, segments, pred, pred_segments


def _rgb(ids: np.ndarray) -> np.ndarray:
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1).astype(np.uint8)


def panopticapi_pq(images: list[tuple[np.ndarray, list[dict], np.ndarray, list[dict]]], folder: Path) -> dict:
    from panopticapi.evaluation import pq_compute

    for name in ("gt", "pred"):
        (folder / name).mkdir(parents=True)
    gt_annotations, pred_annotations = [], []
    for image_id, (gt, gt_segments, pred, pred_segments) in enumerate(images):
        file_name = f"{image_id}.png"
        Image.fromarray(_rgb(gt)).save(folder / "gt" / file_name)
        Image.fromarray(_rgb(pred)).save(folder / "pred" / file_name)
        dataset_id = lambda segment: PANOPTIC_CATEGORIES[segment["category_id"]]["id"]  # noqa: E731
        gt_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": [
            {**s, "category_id": dataset_id(s)} for s in gt_segments]})
        pred_annotations.append({"image_id": image_id, "file_name": file_name, "segments_info": [
            {**s, "category_id": dataset_id(s)} for s in pred_segments]})
    (folder / "gt.json").write_text(json.dumps({"annotations": gt_annotations, "categories": PANOPTIC_CATEGORIES}))
    (folder / "pred.json").write_text(json.dumps({"annotations": pred_annotations}))
    results = pq_compute(str(folder / "gt.json"), str(folder / "pred.json"), str(folder / "gt"), str(folder / "pred"))
    return {
        suffix: {key: float(results[name][key]) for key in ("pq", "sq", "rq", "n")}
        for suffix, name in (("", "All"), ("_th", "Things"), ("_st", "Stuff"))
    }


SEMANTIC_CLASSES = ["wall", "floor", "tree", "sky", "person", "lamp"]


def semantic_set(rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Labels (255 = ignored) and predictions; "lamp" (5) is predicted but never labelled, "person" (4) is
    labelled but never predicted."""
    labels, predictions = [], []
    for _ in range(4):
        label = rng.integers(0, 5, size=(30, 36)).astype(np.uint8)
        label = np.repeat(np.repeat(label[::6, ::6], 6, 0), 6, 1)[:30, :36]
        label[rng.random(label.shape) < 0.1] = 255
        prediction = np.where(rng.random(label.shape) < 0.7, label, rng.integers(0, 4, size=label.shape)).astype(np.int64)
        prediction[prediction == 255] = 1
        prediction[prediction == 4] = 0
        prediction[:4, :4] = 5
        labels.append(label)
        predictions.append(prediction)
    return labels, predictions


def detectron2_miou(labels: list[np.ndarray], predictions: list[np.ndarray], folder: Path) -> dict:
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator

    folder.mkdir(parents=True)
    records = []
    for index, label in enumerate(labels):
        path = folder / f"{index}.png"
        Image.fromarray(label).save(path)
        records.append({"file_name": str(folder / f"{index}.jpg"), "sem_seg_file_name": str(path)})
    name = f"{DATASET_NAME}_semantic"
    DatasetCatalog.register(name, lambda: records)
    MetadataCatalog.get(name).set(stuff_classes=SEMANTIC_CLASSES, ignore_label=255, evaluator_type="sem_seg")
    # its default PNG reader passes copy=False, which numpy 2 refuses; this one reads the same array
    evaluator = SemSegEvaluator(name, distributed=False,
                                sem_seg_loading_fn=lambda path, dtype: np.array(Image.open(path), dtype=dtype))
    evaluator.reset()
    for record, prediction in zip(records, predictions):
        scores = torch.nn.functional.one_hot(torch.from_numpy(prediction), len(SEMANTIC_CLASSES)).permute(2, 0, 1).float()
        evaluator.process([record], [{"sem_seg": scores}])
    results = evaluator.evaluate()["sem_seg"]
    return {key: float(results[key]) for key in ("mIoU", "fwIoU", "mACC", "pACC")}


def make_metrics_fixture(work: Path) -> dict:
    rng = np.random.default_rng(0)
    fixture: dict = {"panoptic_categories": PANOPTIC_CATEGORIES, "panoptic_sets": {}}
    for style in ("coco", "ade"):
        images = [panoptic_image(rng, style == "ade", index) for index in range(4)]
        reference = panopticapi_pq(images, work / style)
        fixture["panoptic_sets"][style] = {
            "images": [
                {"gt": torch.from_numpy(gt.astype(np.int32)), "gt_segments": gs,
                 "pred": torch.from_numpy(pred.astype(np.int32)), "pred_segments": ps}
                for gt, gs, pred, ps in images
            ],
            "panopticapi": reference,
        }
        print(f"{style}: panopticapi PQ {100 * reference['']['pq']:.3f}")
    labels, predictions = semantic_set(rng)
    fixture["semantic"] = {
        "classes": SEMANTIC_CLASSES,
        "labels": [torch.from_numpy(label) for label in labels],
        "predictions": [torch.from_numpy(prediction.astype(np.uint8)) for prediction in predictions],
        "detectron2": detectron2_miou(labels, predictions, work / "semantic"),
    }
    print(f"semantic: detectron2 mIoU {fixture['semantic']['detectron2']['mIoU']:.3f}")
    return fixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mask2former", type=Path, required=True, help="checkout of facebookresearch/Mask2Former")
    parser.add_argument("--panopticapi", type=Path, required=True, help="checkout of cocodataset/panopticapi")
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    import_official(args.mask2former.resolve(), args.panopticapi.resolve())
    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(make_model_fixture(args.mask2former.resolve()), args.out / "mask2former_official.pt")
    with tempfile.TemporaryDirectory() as work:
        torch.save(make_metrics_fixture(Path(work)), args.out / "segmentation_metrics.pt")
    for name in ("mask2former_official.pt", "segmentation_metrics.pt"):
        print(f"wrote {args.out / name} ({(args.out / name).stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()

"""Our DINO equals the official FocalNet-DINO number for number.

tests/fixtures/dino_official.pt is written by scripts/make_dino_fixtures.py from the official code: a
4-scale (FocalNet-L fl3 kind) and a 5-scale (fl4 kind) model with tiny backbones and trained-like
weights, their checkpoints in the official layout, and their float64 outputs on odd-sized images and
padded batches of 2. Here the checkpoints go through ``load_detector_weights`` with strict checks,
and our float64 outputs are compared: class logits and boxes of every decoder layer, the selected
encoder proposals, and the post-processed top-k.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.modeling import build_model

from focalnet_pl import load_detector_weights
from focalnet_pl.d2 import build_detectron2_cfg
from focalnet_pl.detector_weights import SAFE_CHECKPOINT_GLOBALS, read_detector_checkpoint
from focalnet_pl.dino.layouts import OfficialDINOLayout
from focalnet_pl.weights import CheckpointError

FIXTURE = Path(__file__).parent / "fixtures" / "dino_official.pt"
TOLERANCE = 1e-6
COCO_THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]
COCO_IDS = [c["id"] for c in COCO_THINGS]
COCO_NAMES = [c["name"] for c in COCO_THINGS]


@pytest.fixture(scope="module")
def official() -> dict:
    return read_detector_checkpoint(FIXTURE, SAFE_CHECKPOINT_GLOBALS)


def dino_config(entry: dict, num_classes: int, **dino) -> dict:
    """Our config of the fixture's architecture (the official args plus the tiny backbone)."""
    args, architecture = entry["checkpoint"]["args"], entry["architecture"]
    in_features = ["res2", "res3", "res4", "res5"][4 - len(args.return_interm_indices):]
    return {"INPUT": {"FORMAT": "RGB"}, "MODEL": {
        "META_ARCHITECTURE": "DINO", "DEVICE": "cpu", "BACKBONE": {"NAME": "build_focalnet_backbone"},
        "MASK_PADDING": False,  # the official DINO computes on the padding
        # the official ToTensor + Normalize in 0-255 units
        "PIXEL_MEAN": [123.675, 116.28, 103.53], "PIXEL_STD": [58.395, 57.12, 57.375],
        "FOCALNET": {
            "VARIANT": f"focalnet_large_fl{args.focal_levels}", "EMBED_DIM": architecture["embed_dim"],
            "DEPTHS": architecture["depths"], "FOCAL_LEVELS": [args.focal_levels] * 4,
            "FOCAL_WINDOWS": [args.focal_windows] * 4, "DROP_PATH_RATE": 0.0, "OUT_FEATURES": in_features,
        },
        "DINO": {
            "NUM_CLASSES": num_classes, "IN_FEATURES": in_features, "NUM_FEATURE_LEVELS": args.num_feature_levels,
            "HIDDEN_DIM": args.hidden_dim, "NHEADS": args.nheads, "ENC_LAYERS": args.enc_layers,
            "DEC_LAYERS": args.dec_layers, "DIM_FEEDFORWARD": args.dim_feedforward, "ENC_N_POINTS": args.enc_n_points,
            "DEC_N_POINTS": args.dec_n_points, "NUM_QUERIES": args.num_queries, "NUM_SELECT": args.num_select,
            "PE_TEMPERATURE": float(args.pe_temperatureH), **dino,
        },
    }}


def build_dino(entry: dict, num_classes: int, **dino) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(build_detectron2_cfg(dino_config(entry, num_classes, **dino))).double().eval()


def inputs_of(case: dict) -> list[dict]:
    return [{"image": image.double(), "height": int(size[0]), "width": int(size[1])}
            for image, size in zip(case["images"], case["output_sizes"])]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def assert_matches_official(model: torch.nn.Module, case: dict, columns: list[int] | None = None) -> dict[str, float]:
    """Every output of ``model`` against the official ones; ``columns``: the official class column of each
    of our classes (all 91 when None). Returns the largest differences."""
    inputs = inputs_of(case)
    with torch.no_grad():
        out, _ = model.predict(inputs)
        results = model(inputs)
    select = (lambda t: t) if columns is None else (lambda t: t[..., columns])
    diffs = {
        "logits": max(max_diff(ours, select(theirs)) for ours, theirs in zip(out.logits, case["pred_logits"])),
        "boxes": max(max_diff(ours, theirs) for ours, theirs in zip(out.boxes, case["pred_boxes"])),
        "proposal logits": max_diff(out.encoder_logits, select(case["interm_logits"])),
        "proposal boxes": max_diff(out.encoder_boxes, case["interm_boxes"]),
    }
    top = {"scores": 0.0, "boxes": 0.0}
    for index, result in enumerate(results):
        instances = result["instances"]
        labels, scores, boxes = case["labels"][index], case["scores"][index], case["boxes"][index]
        if columns is not None:  # the official top-k over 91 columns, without the ids that are no class
            keep = torch.isin(labels, torch.tensor(columns))
            position = {column: i for i, column in enumerate(columns)}
            labels = torch.tensor([position[int(label)] for label in labels[keep]], dtype=torch.long)
            scores, boxes = scores[keep], boxes[keep]
        count = len(labels)
        assert instances.image_size == tuple(case["output_sizes"][index].tolist())
        assert torch.equal(instances.pred_classes[:count], labels)
        top["scores"] = max(top["scores"], max_diff(instances.scores[:count], scores))
        # detectron2's Boxes hold float32: compare in units of the output size
        size = case["output_sizes"][index].flip(0).repeat(2).double()
        top["boxes"] = max(top["boxes"], max_diff(instances.pred_boxes.tensor[:count].double() / size, boxes / size))
    diffs.update({f"top-k {k}": v for k, v in top.items()})
    assert all(value <= TOLERANCE for value in diffs.values()), str(diffs)
    return diffs


@pytest.mark.parametrize("name", ["fl3", "fl4"])
def test_official_checkpoint_all_91_rows_gives_the_official_outputs(official, name, one_thread):
    entry = official[name]
    model = build_dino(entry, num_classes=91)
    report = load_detector_weights(model, entry["checkpoint"], class_ids=list(range(91)))
    assert report.layout == "official-dino" and not report.problems() and not report.reinitialised
    assert set(report.loaded) | set(report.converted) == set(model.state_dict())
    for case in entry["cases"]:
        assert_matches_official(model, case)


def test_masking_the_padding_changes_nothing_on_an_image_alone(official, one_thread):
    """``MODEL.MASK_PADDING`` (our default) gives the official outputs where there is no padding: one image."""
    entry = official["fl4"]
    config = dino_config(entry, num_classes=91)
    config["MODEL"]["MASK_PADDING"] = True
    model = build_model(build_detectron2_cfg(config)).double().eval()
    load_detector_weights(model, entry["checkpoint"], class_ids=list(range(91)))
    for case in entry["cases"]:
        if len(case["images"]) == 1:
            assert_matches_official(model, case)


def test_coco_rows_selected_by_category_id(official, one_thread):
    """Our 80 COCO classes from the official 91-row layout: logits are the official columns of the COCO
    ids, the top-k the official one without the 11 unused ids."""
    entry = official["fl3"]
    model = build_dino(entry, num_classes=80)
    report = load_detector_weights(model, entry["checkpoint"], class_ids=COCO_IDS, class_names=COCO_NAMES)
    assert not report.problems() and not report.reinitialised
    for key in ("transformer.class_head.weight", "transformer.proposal_class_head.bias", "label_embedding.weight"):
        assert key in report.converted
    torch.testing.assert_close(model.label_embedding.weight, entry["checkpoint"]["model"]["label_enc.weight"][COCO_IDS].double())
    for case in entry["cases"][2:]:
        assert_matches_official(model, case, columns=COCO_IDS)


def test_per_layer_heads_take_the_shared_copies(official, one_thread):
    entry = official["fl3"]
    model = build_dino(entry, num_classes=91, SHARE_DECODER_HEADS=False)
    report = load_detector_weights(model, entry["checkpoint"], class_ids=list(range(91)))
    assert "transformer.class_heads.1.weight" in report.converted
    assert_matches_official(model, entry["cases"][3])


def test_copies_that_differ_and_other_architectures_are_refused(official, tmp_path):
    entry = official["fl3"]
    state = dict(entry["checkpoint"]["model"])
    state["class_embed.1.weight"] = state["class_embed.1.weight"].double() + 1
    with pytest.raises(CheckpointError, match=r"head per decoder layer \(class_embed.1.weight.*SHARE_DECODER_HEADS"):
        load_detector_weights(build_dino(entry, 91), {"model": state})
    # a 5-scale checkpoint into the 4-scale model, and a wider backbone
    with pytest.raises(CheckpointError, match=r"feature levels \(MODEL.DINO.NUM_FEATURE_LEVELS\): checkpoint 5, model 4"
                                             r".*backbone feature maps.*checkpoint 4, model 3.*focal levels.*checkpoint 4, model 3"):
        load_detector_weights(build_dino(entry, 91), official["fl4"]["checkpoint"])
    wide_cfg = dino_config(entry, 91)
    wide_cfg["MODEL"]["FOCALNET"]["EMBED_DIM"] = 16
    wide = build_model(build_detectron2_cfg(wide_cfg))
    with pytest.raises(CheckpointError, match=r"backbone width .*: checkpoint 8, model 16"):
        load_detector_weights(wide, entry["checkpoint"])


def test_official_file_with_args_loads_safely(official, tmp_path):
    """The file as the official main.py writes it (args: argparse.Namespace) is read with weights_only."""
    entry = official["fl4"]
    path = tmp_path / "checkpoint0011.pth"
    torch.save(entry["checkpoint"], path)
    model = build_dino(entry, num_classes=80)
    report = load_detector_weights(model, str(path), class_ids=COCO_IDS, class_names=COCO_NAMES)
    assert report.layout == "official-dino" and not report.problems()
    torch.testing.assert_close(model.transformer.level_embed, entry["checkpoint"]["model"]["transformer.level_embed"].double())


@pytest.mark.parametrize("name", ["fl3", "fl4"])
def test_initialisation_follows_the_official_code(official, name):
    """Training from scratch starts from the official distributions (``DeformableTransformer._reset_parameters``
    and the DINO init): seed-independent tensors equal, random ones of the same spread; the backbone aside."""
    entry = official[name]
    model = build_dino(entry, num_classes=91)
    ours = model.state_dict()
    mapping = OfficialDINOLayout().key_map(list(entry["init"]), len(model.transformer.decoder_layers), True)
    for key, init in entry["init"].items():
        value = ours[mapping[key]]
        if "constant" in init:
            assert bool((value == init["constant"]).all()), key
        elif "value" in init:
            torch.testing.assert_close(value.float(), init["value"], msg=key)
        else:
            spread = 3 / value.numel() ** 0.5
            assert abs(float(value.std()) / init["std"] - 1) < 0.05 + spread, (key, float(value.std()), init)
            assert abs(float(value.mean()) - init["mean"]) < 2 * spread * init["std"], (key, float(value.mean()), init)
            assert float(value.abs().max()) < 1.5 * init["absmax"], key
    assert {mapping[key] for key in entry["init"]} == {key for key in ours if not key.startswith("backbone.")}
    # the encoder-proposal heads start as copies of the decoder heads (the official deepcopy)
    for ours_head, theirs in ((model.transformer.proposal_class_head, model.transformer.class_head),
                              (model.transformer.proposal_box_head, model.transformer.box_head)):
        for a, b in zip(ours_head.parameters(), theirs.parameters()):
            assert torch.equal(a, b)


def cli_model_overrides(entry: dict, weights: Path) -> dict:
    """The fixture's architecture and its checkpoint as ``MODEL.WEIGHTS`` (the classes come from the data)."""
    model = dino_config(entry, num_classes=0)["MODEL"]
    del model["DINO"]["NUM_CLASSES"]
    return dict(model, WEIGHTS=str(weights))


@pytest.mark.slow
def test_released_checkpoint_evaluates_via_cli(official, make_coco_dataset, small_cli_config, tmp_path, one_thread):
    """``cli.py test`` with the released model's evaluation config and an official-layout ``MODEL.WEIGHTS``:
    the file is read safely, its COCO rows picked by the dataset's category ids, and evaluated."""
    from focalnet_pl.cli import FocalNetCLI

    entry = official["fl4"]
    weights = tmp_path / "focalnet_large_fl4_o365_finetuned_on_coco.pth"
    torch.save(entry["checkpoint"], weights)
    coco = make_coco_dataset([(1, "person"), (3, "car")])
    config = small_cli_config("dino_focalnet_l_o365_coco_eval", coco, cli_model_overrides(entry, weights))
    cli = FocalNetCLI(args=["test", "--config", str(config)])
    report = cli.model.weights_report
    assert report.layout == "official-dino" and not report.problems() and not report.reinitialised
    head = cli.model.model.transformer.class_head.weight
    torch.testing.assert_close(head, entry["checkpoint"]["model"]["class_embed.0.weight"][[1, 3]].float())
    detections = json.loads(next(tmp_path.rglob("test_*.json")).read_text())
    assert detections and {d["category_id"] for d in detections} <= {1, 3}


@pytest.mark.slow
def test_finetuning_a_released_checkpoint_on_other_classes(official, make_coco_dataset, small_cli_config, tmp_path,
                                                           one_thread):
    """``cli.py fit`` on a 5-class dataset from an official-layout checkpoint: the class tensors start fresh
    (the report says which and why), everything else is loaded."""
    from focalnet_pl.cli import FocalNetCLI

    entry = official["fl3"]
    weights = tmp_path / "checkpoint0011.pth"
    torch.save(entry["checkpoint"], weights)
    coco = make_coco_dataset([(1, "cat"), (2, "dog"), (3, "fox"), (4, "owl"), (5, "yak")])
    config = small_cli_config("dino_focalnet_l_fl3", coco, cli_model_overrides(entry, weights))
    cli = FocalNetCLI(args=["fit", "--config", str(config)])
    report = cli.model.weights_report
    class_keys = {"transformer.class_head.weight", "transformer.class_head.bias", "transformer.proposal_class_head.weight",
                  "transformer.proposal_class_head.bias", "label_embedding.weight"}
    assert {entry.split(":")[0] for entry in report.reinitialised} == class_keys
    assert all("id 1 is 'cat' in the dataset, 'person' in the checkpoint" in entry for entry in report.reinitialised)
    assert not report.problems()
    assert set(report.loaded) | set(report.converted) == set(cli.model.model.state_dict()) - class_keys
    assert cli.model.model.transformer.class_head.weight.shape[0] == 5
    assert sorted(tmp_path.rglob("val_*.json")), "no validation after fine-tuning"


def test_detrex_checkpoint_gives_the_detrex_outputs(official, one_thread):
    """A detrex DINO checkpoint (FocalNet-L fl3 config, tiny) in a model configured as detrex's: one head per
    decoder layer, position embedding offset -0.5 and temperature 10000, 4 sampling points, COCO's 80
    classes in id order; detrex's outputs of every decoder layer and its selected proposals, on single images."""
    entry = official["detrex"]
    model = build_dino(official["fl3"], num_classes=80, SHARE_DECODER_HEADS=False, PE_TEMPERATURE=10000.0,
                       PE_OFFSET=-0.5, ENC_N_POINTS=4, DEC_N_POINTS=4)
    report = load_detector_weights(model, entry["checkpoint"], class_ids=COCO_IDS, class_names=COCO_NAMES)
    assert report.layout == "detrex-dino" and not report.problems() and not report.reinitialised
    assert set(report.converted) == set(model.state_dict())
    heads = [model.transformer.class_heads[i].weight for i in range(2)] + [model.transformer.proposal_class_head.weight]
    assert not torch.equal(heads[0], heads[1]) and not torch.equal(heads[1], heads[2])
    for case in entry["cases"]:
        with torch.no_grad():
            out, _ = model.predict([{"image": image.double()} for image in case["images"]])
        diffs = {
            "logits": max(max_diff(ours, theirs) for ours, theirs in zip(out.logits, case["pred_logits"])),
            "boxes": max(max_diff(ours, theirs) for ours, theirs in zip(out.boxes, case["pred_boxes"])),
            "proposal logits": max_diff(out.encoder_logits, case["interm_logits"]),
            "proposal boxes": max_diff(out.encoder_boxes, case["interm_boxes"]),
        }
        assert all(value <= TOLERANCE for value in diffs.values()), str(diffs)

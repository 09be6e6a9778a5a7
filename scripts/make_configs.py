"""Write the configs of each family from its template and its table of variants.

    python scripts/make_configs.py           # (re)write the files
    python scripts/make_configs.py --check   # exit 1 when a file differs from what its template gives

Every config stays one file (``python cli.py fit --config configs/<name>.yaml``) although the members of a
family share most of their text: jsonargparse cannot include one file in another (a nested ``config:`` key
replaces dict-valued options such as the detectron2 config instead of merging them), so the files are
generated. A family's shared text is its template under ``configs/templates/`` (``$placeholders``,
:class:`string.Template`), what differs between its members is the tables below; tests/test_configs.py
checks that the files are up to date.
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from string import Template

REPO = Path(__file__).resolve().parents[1]

#: Mask R-CNN (mmdetection's FocalNet recipes): backbone size x focal range x schedule
MASK_RCNN_SIZES = {  # letter: (variant size name, drop path rate of the 1x and the 3x schedule)
    "t": ("tiny", {"1x": 0.1, "3x": 0.3}),
    "s": ("small", {"1x": 0.2, "3x": 0.5}),
    "b": ("base", {"1x": 0.3, "3x": 0.5}),
}
MASK_RCNN_FOCAL_LEVELS = {"srf": 2, "lrf": 3}
MASK_RCNN_SCHEDULES = {"1x": (12, 9, 11), "3x": (36, 27, 33)}  # epochs, the two lr decay epochs


def mask_rcnn_variants() -> dict[str, dict[str, object]]:
    """``{config name: template values}`` of the 12 Mask R-CNN configs."""
    variants = {}
    for (size, (size_name, drop_paths)), (focal, level), (schedule, (epochs, first, second)) in itertools.product(
        MASK_RCNN_SIZES.items(), MASK_RCNN_FOCAL_LEVELS.items(), MASK_RCNN_SCHEDULES.items()
    ):
        name = f"mask_rcnn_focalnet_{size}_{focal}_{schedule}"
        variants[name] = {
            "name": name, "dashed_name": name.replace("_", "-"), "letter": size.upper(), "size_name": size_name,
            "focal": focal, "FOCAL": focal.upper(), "focal_level": level, "variant": f"focalnet_{size_name}_{focal}",
            "drop_path": drop_paths[schedule], "schedule": schedule, "epochs": epochs,
            "first_decay": first, "second_decay": second,
        }
    return variants


#: Mask2Former (the official recipes): backbone sizes; their values shared by every dataset
MASK2FORMER_BACKBONES = {
    "t": {"letter": "T", "backbone": "LRF, ImageNet-1k", "variant": "focalnet_tiny_lrf",
          "weights": "ImageNet-1k FocalNet-T LRF checkpoint (focalnet_tiny_lrf.pth)", "memory_note": ""},
    "l": {"letter": "L", "backbone": "focal level 4, ImageNet-22k, 384 px", "variant": "focalnet_large_fl4",
          "weights": "ImageNet-22k FocalNet-L fl4 checkpoint (focalnet_large_lrf_384_fl4.pth)",
          "memory_note": "# Enable MODEL.FOCALNET.GRAD_CHECKPOINTING on GPUs with less than 40 GB.\n"},
}
_ADE_PANOPTIC = {
    "task": "panoptic", "classes": "150 categories: 100 things, 50 stuff", "datamodule": "ADE20KPanopticDataModule",
    "panoptic_on": "true", "metric": "PQ", "test_metrics": "test/PQ, test/PQ_th, test/PQ_st, test/mIoU, test/segm_AP",
    "evaluation_note": "# mIoU against the semantic annotations (annotations_detectron2), instance AP (segm) against the "
                       "panoptic things.\n",
    "data_note": "# ADE20K panoptic files: convert ADE20K with Mask2Former's datasets/prepare_ade20k_pan_seg.py (and "
                 "prepare_ade20k_sem_seg.py\n# for annotations_detectron2; without it the raw annotations/ folder "
                 "gives the same labels).\n",
    "crop": 640, "test_max_size": 2560,
}
_ADE_SEMANTIC = {
    "task": "semantic", "classes": "150 classes", "datamodule": "ADE20KSemanticDataModule", "panoptic_on": "false",
    "metric": "mIoU", "test_metrics": "test/mIoU", "evaluation_note": "", "data_note": "", "queries": 100,
}
#: (backbone, dataset): what differs from the backbone's values
MASK2FORMER_VARIANTS = {
    ("t", "ade20k_panoptic"): {**_ADE_PANOPTIC, "paper_note": "", "queries": 100,
                               "official_configs": "Base-ADE20K-PanopticSegmentation + maskformer2_R50_bs16_160k, "
                                                   "640 px for every backbone"},
    ("l", "ade20k_panoptic"): {**_ADE_PANOPTIC, "paper_note": "", "queries": 200,
                               "official_configs": "Base-ADE20K-PanopticSegmentation + maskformer2_R50_bs16_160k + "
                                                   "swin/*_large_IN21k_384_bs16_160k"},
    ("t", "ade20k_semantic"): {**_ADE_SEMANTIC, "paper_note": "", "crop": 512, "test_max_size": 2048,
                               "official_configs": "maskformer2_R50_bs16_160k + swin/*_tiny_bs16_160k"},
    ("l", "ade20k_semantic"): {**_ADE_SEMANTIC, "crop": 640, "test_max_size": 2560,
                               "paper_note": "# FocalNet paper: 58.5 mIoU on ADE20K val with this backbone and recipe.\n",
                               "official_configs": "maskformer2_R50_bs16_160k + swin/*_large_IN21k_384_bs16_160k_res640"},
    ("t", "coco_panoptic"): {"paper_note": "", "queries": 100, "official_config": "swin/maskformer2_swin_tiny_bs16_50ep",
                             "epochs": 50, "iterations": "368,750", "decay_iterations": "327,778 and 355,092",
                             "first_decay": 44, "second_decay": 48},
    ("l", "coco_panoptic"): {"paper_note": "# FocalNet paper: 57.9 PQ on COCO val with this backbone and recipe.\n",
                             "queries": 200, "official_config": "swin/maskformer2_swin_large_IN21k_384_bs16_100ep",
                             "epochs": 100, "iterations": "737,500", "decay_iterations": "655,556 and 710,184",
                             "first_decay": 89, "second_decay": 96},
}


def mask2former_variants(datasets: tuple[str, ...]) -> dict[str, dict[str, object]]:
    """``{config name: template values}`` of the Mask2Former configs of ``datasets``."""
    return {
        f"mask2former_focalnet_{size}_{dataset}": {
            **MASK2FORMER_BACKBONES[size], **values, "name": f"mask2former_focalnet_{size}_{dataset}",
        }
        for (size, dataset), values in MASK2FORMER_VARIANTS.items() if dataset in datasets
    }


#: family: (template, its variants)
FAMILIES = {
    "mask_rcnn_focalnet": ("configs/templates/mask_rcnn_focalnet.yaml.in", mask_rcnn_variants),
    "mask2former_focalnet_ade20k": ("configs/templates/mask2former_focalnet_ade20k.yaml.in",
                                    lambda: mask2former_variants(("ade20k_panoptic", "ade20k_semantic"))),
    "mask2former_focalnet_coco_panoptic": ("configs/templates/mask2former_focalnet_coco_panoptic.yaml.in",
                                           lambda: mask2former_variants(("coco_panoptic",))),
}


def render_all() -> dict[Path, str]:
    """Every generated config path and the text its template gives."""
    files = {}
    for template_path, variants in FAMILIES.values():
        template = Template((REPO / template_path).read_text())
        for name, values in variants().items():
            files[REPO / "configs" / f"{name}.yaml"] = template.substitute(values, template=template_path)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report files that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = {path: text for path, text in render_all().items() if not path.is_file() or path.read_text() != text}
    for path, text in stale.items():
        if args.check:
            print(f"{path.relative_to(REPO)} is not what its template gives: run python scripts/make_configs.py")
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(REPO)}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())

"""Write the configs of each family from its template and its table of variants.

    python scripts/make_configs.py           # (re)write the files
    python scripts/make_configs.py --check   # exit 1 when a file differs from what its template gives

jsonargparse (``--config``) cannot include one file in another, so that every config stays one
``python cli.py fit --config configs/<name>.yaml``, the files are generated: a family's shared text is
its template under ``configs/templates/`` (``$placeholders``, :class:`string.Template`), what differs
between its members is the table below. tests/test_configs.py checks that the files are up to date.
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


#: family: (template, its variants)
FAMILIES = {"mask_rcnn_focalnet": ("configs/templates/mask_rcnn_focalnet.yaml.in", mask_rcnn_variants)}


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

"""``cli.py export``: a training checkpoint's backbone or full model as safetensors, with its config.

    python cli.py export --config configs/demo/classification_shapes.yaml \\
        --ckpt_path runs/.../last.ckpt --output exports/shapes_backbone.safetensors [--part backbone|model]

``backbone`` writes the FocalNet (official parameter names, its classifier head included when it has
one) so that ``create_focalnet(variant, weights=...)`` or :func:`focalnet_from_export` reads it back;
``model`` writes the whole LightningModule ``state_dict``. The FocalNet config, the task's
architecture record (classes, feature levels, input format, evaluation size), its hyper-parameters and
the run config go in the safetensors metadata and in a sidecar ``.yaml``.
Checkpoints are read with ``torch.load(weights_only=True)``; nothing is unpickled.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
import yaml
from torch import nn

from focalnet_pl.cli import CHECKPOINT_ALIASES, resolve_checkpoint_alias, run_root
from focalnet_pl.focalnet import FocalNet, FocalNetConfig
from focalnet_pl.reliability import safe_torch_load
from focalnet_pl.weights import CheckpointError, load_weights, read_safetensors_metadata

log = logging.getLogger(__name__)

Part = Literal["backbone", "model"]
EXPORT_FORMAT = "focalnet-pl"


def read_config(path: str | Path) -> dict[str, Any]:
    """A YAML run config as plain data (``yaml.safe_load``: no tags, nothing executed)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config {path} is not valid YAML: {err}") from err
    if not isinstance(config, dict):
        raise TypeError(f"config {path} must be a mapping, got {type(config).__name__}")
    return config


def _task_class(class_path: str) -> type[L.LightningModule]:
    module_name, _, name = class_path.rpartition(".")
    if not module_name:
        raise ValueError(f"model.class_path must be 'package.module.Class', got {class_path!r}")
    cls = getattr(importlib.import_module(module_name), name, None)
    if not (inspect.isclass(cls) and issubclass(cls, L.LightningModule)):
        raise ValueError(f"model.class_path {class_path!r} is not a LightningModule class")
    return cls


def load_task(config: dict[str, Any], ckpt_path: str | Path) -> L.LightningModule:
    """The config's LightningModule, built from the checkpoint's hyper-parameters, with its weights.

    The model section gives the class (``model.class_path``) and defaults; the checkpoint's
    ``hyper_parameters`` win (they hold e.g. ``num_classes`` resolved from the data). A ``weights``
    argument (pretrained source) is dropped: every weight comes from the checkpoint.
    """
    model_section = config.get("model") or {}
    if "class_path" not in model_section:
        raise ValueError("the config has no model.class_path: cannot tell which task the checkpoint belongs to")
    cls = _task_class(model_section["class_path"])
    checkpoint = safe_torch_load(ckpt_path)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint (no 'state_dict')")
    init_args = dict(model_section.get("init_args") or {})
    init_args.update(checkpoint.get("hyper_parameters") or {})
    accepted = inspect.signature(cls.__init__).parameters
    if "weights" in accepted:
        init_args["weights"] = None
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        init_args = {k: v for k, v in init_args.items() if k in accepted}
    task = cls(**init_args)
    task.on_load_checkpoint(checkpoint)  # as Lightning does before loading the weights
    try:
        task.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {ckpt_path} does not fit {cls.__name__} built from its config: {err}") from err
    return task.eval()


def find_focalnet(module: nn.Module) -> FocalNet:
    """The FocalNet inside ``module`` (its EMA copy when the task evaluates with one)."""
    eval_model = getattr(module, "_eval_model", None)
    if callable(eval_model):
        candidate = eval_model()
        if isinstance(candidate, FocalNet):
            return candidate
    for sub in module.modules():
        if isinstance(sub, FocalNet):
            return sub
    raise ValueError(f"{type(module).__name__} contains no FocalNet")


def _plain(value: Any) -> Any:
    """``value`` as YAML/JSON-safe data (tuples to lists, unknown objects to strings)."""
    return json.loads(json.dumps(value, default=str))


def export_weights(task: nn.Module, output: str | Path, part: Part = "backbone", *,
                   config: dict[str, Any] | None = None, source: str | None = None) -> Path:
    """Write ``task``'s backbone or full model to ``output`` (safetensors) and ``output.yaml``."""
    from safetensors.torch import save_file

    if part not in ("backbone", "model"):
        raise ValueError(f"part must be 'backbone' or 'model', got {part!r}")
    output = Path(output)
    if output.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {output}")
    focalnet = find_focalnet(task)
    module = focalnet if part == "backbone" else task
    # clone: safetensors refuses tensors that share memory (e.g. tied or EMA-aliased weights)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    info: dict[str, Any] = {
        "format": EXPORT_FORMAT,
        "part": part,
        "focalnet_config": asdict(focalnet.cfg),
        "num_classes": int(focalnet.num_classes),
        "features_only": bool(focalnet.features_only),
        "task_class": f"{type(task).__module__}.{type(task).__qualname__}",
    }
    architecture = getattr(task, "architecture", None)
    if callable(architecture):
        info["architecture"] = architecture()
    hparams = getattr(task, "hparams", None)
    if hparams:
        info["hyper_parameters"] = _plain(dict(hparams))
    if source is not None:
        info["source_checkpoint"] = str(source)
    if config is not None:
        info["config"] = _plain(config)
    metadata = {key: value if isinstance(value, str) else json.dumps(_plain(value)) for key, value in info.items()}
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(output)
    output.with_suffix(".yaml").write_text(yaml.safe_dump(_plain(info), sort_keys=False))
    log.info("Wrote %d tensors (%s) to %s", len(state), part, output)
    return output


def read_export_info(path: str | Path) -> dict[str, Any]:
    """The metadata of a file written by :func:`export_weights`, JSON values decoded."""
    metadata = read_safetensors_metadata(path)
    if metadata.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a focalnet-pl export (metadata format={metadata.get('format')!r})")
    return {key: value if key in ("format", "part", "task_class", "source_checkpoint") else json.loads(value)
            for key, value in metadata.items()}


def focalnet_from_export(path: str | Path, features_only: bool | None = None, **kwargs: Any) -> FocalNet:
    """Rebuild the FocalNet of a backbone export from its metadata and load its weights.

    ``features_only=True`` gives the dense backbone of an exported classifier (head dropped);
    ``kwargs`` go to :class:`~focalnet_pl.focalnet.FocalNet` (``out_indices``, ``frozen_stages``...).
    """
    info = read_export_info(path)
    if info["part"] != "backbone":
        raise CheckpointError(f"{path} holds a full task model; export it with --part backbone to build a FocalNet")
    cfg = FocalNetConfig(**info["focalnet_config"])
    dense = info["features_only"] if features_only is None else features_only
    model = FocalNet(cfg, num_classes=info["num_classes"], features_only=dense, **kwargs)
    load_weights(model, path, strict=True)
    return model


def main(argv: list[str]) -> None:
    """``cli.py export --config X --ckpt_path Y --output Z.safetensors [--part backbone|model]``."""
    parser = argparse.ArgumentParser(prog="cli.py export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML config (gives the task class)")
    parser.add_argument("--ckpt_path", required=True,
                        help="Lightning checkpoint (.ckpt), or best / last: the newest run of --config")
    parser.add_argument("--output", required=True, help="output .safetensors file (a .yaml sidecar is written too)")
    parser.add_argument("--part", choices=("backbone", "model"), default="backbone")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = read_config(args.config)
    ckpt_path = args.ckpt_path
    if ckpt_path in CHECKPOINT_ALIASES:
        ckpt_path = str(resolve_checkpoint_alias(run_root(config.get("trainer") or {}), ckpt_path))
    task = load_task(config, ckpt_path)
    path = export_weights(task, args.output, args.part, config=config, source=ckpt_path)
    print(f"wrote {path} and {path.with_suffix('.yaml')}")

"""``cli.py export``: a training checkpoint as safetensors (weights + config) or as an ONNX model.

    python cli.py export --config configs/demo/classification_shapes.yaml \\
        --ckpt_path runs/.../last.ckpt --output exports/shapes_backbone.safetensors [--part backbone|model]
    python cli.py export --format onnx --config ... --ckpt_path ... --output exports/shapes.onnx

safetensors: ``backbone`` writes the FocalNet (official parameter names, its classifier head included
when it has one) so that ``create_focalnet(variant, weights=...)`` or :func:`focalnet_from_export`
reads it back; ``model`` writes the whole LightningModule ``state_dict``. The FocalNet config, the
task's architecture record (classes, feature levels, input format, evaluation size), its hyper-parameters
and the run config go in the safetensors metadata and in a sidecar ``.yaml``.

ONNX: the task says what to export through its ``onnx_export_spec()`` hook (an :class:`OnnxExportSpec`:
module, example inputs, input/output names, dynamic axes); :func:`export_onnx` traces it with
``torch.export`` (batch, height and width left dynamic), writes the model with the task's metadata
and compares onnxruntime (CPU) with PyTorch on the example and check inputs.

Checkpoints are read with ``torch.load(weights_only=True)`` (:mod:`focalnet_pl.io`); nothing runs code.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
import yaml
from torch import nn

from focalnet_pl import cpu_fastpath
from focalnet_pl.cli import CHECKPOINT_ALIASES, resolve_checkpoint_alias, run_root
from focalnet_pl.focalnet import FocalNet, FocalNetConfig
from focalnet_pl.io import CheckpointError, reading_checkpoint, save_safetensors_file
from focalnet_pl.weights import load_weights, read_safetensors_metadata

log = logging.getLogger(__name__)

Part = Literal["backbone", "model"]
EXPORT_FORMAT = "focalnet-pl"
#: default bound of the onnxruntime vs PyTorch difference that :func:`export_onnx` accepts
ONNX_TOLERANCE = 1e-4


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
    """The config's LightningModule (its class: ``model.class_path``) as Lightning's ``load_from_checkpoint``
    builds it from the checkpoint's hyper-parameters, with the checkpoint's weights, read with
    ``weights_only=True``. A ``weights`` argument (pretrained source) is dropped: every weight comes
    from the checkpoint."""
    model_section = config.get("model") or {}
    if "class_path" not in model_section:
        raise ValueError("the config has no model.class_path: cannot tell which task the checkpoint belongs to")
    cls = _task_class(model_section["class_path"])
    with reading_checkpoint(ckpt_path):
        try:
            task = cls.load_from_checkpoint(ckpt_path, map_location="cpu", weights_only=True, weights=None)
        except KeyError as err:
            if err.args[:1] not in (("pytorch-lightning_version",), ("state_dict",)):
                raise
            raise CheckpointError(f"{ckpt_path} is not a Lightning checkpoint (no {err})") from err
        except RuntimeError as err:
            if "loading state_dict" not in str(err):
                raise
            raise CheckpointError(f"checkpoint {ckpt_path} does not fit {cls.__name__} built from its config: {err}") from err
    return task.eval()


def find_focalnet(module: nn.Module) -> FocalNet:
    """The FocalNet inside ``module``."""
    for sub in module.modules():
        if isinstance(sub, FocalNet):
            return sub
    raise ValueError(f"{type(module).__name__} contains no FocalNet")


def _plain(value: Any) -> Any:
    """``value`` as YAML/JSON-safe data (tuples to lists, unknown objects to strings)."""
    return json.loads(json.dumps(value, default=str))


def _run_info(task: nn.Module, config: dict[str, Any] | None, source: str | None) -> dict[str, Any]:
    """What every export records: its format, the task class and hyper-parameters, the source checkpoint
    and the run config."""
    info: dict[str, Any] = {"format": EXPORT_FORMAT, "task_class": f"{type(task).__module__}.{type(task).__qualname__}"}
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
    return info


def _string_metadata(info: dict[str, Any]) -> dict[str, str]:
    """``info`` as string key/values (files' metadata): strings as they are, the rest as JSON."""
    return {key: value if isinstance(value, str) else json.dumps(_plain(value)) for key, value in info.items()}


def export_weights(task: nn.Module, output: str | Path, part: Part = "backbone", *,
                   config: dict[str, Any] | None = None, source: str | None = None) -> Path:
    """Write ``task``'s backbone or full model to ``output`` (safetensors) and ``output.yaml``."""
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
    } | _run_info(task, config, source)
    save_safetensors_file(state, output, _string_metadata(info))
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


@dataclass
class OnnxExportSpec:
    """What a task exports to ONNX, returned by its ``onnx_export_spec()`` hook.

    Args:
        module: the module to trace (eval mode); ``module(*example_inputs)`` returns a tensor or a
            tuple of tensors, one per ``output_names`` entry.
        example_inputs: the inputs traced (sizes that are neither 0 nor 1 on the dynamic axes, and
            distinct from one another, so that no size gets baked into the graph).
        input_names, output_names: names of the ONNX graph's inputs and outputs.
        dynamic_axes: per input, ``{axis: name}`` of the axes left free (e.g. batch, height, width).
        check_inputs: further inputs (other sizes) on which onnxruntime is compared with PyTorch.
        metadata: extra ``metadata_props`` of the ONNX model (e.g. class names, input normalisation).
    """

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: tuple[dict[int, str], ...]
    check_inputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def onnx_export_spec(task: nn.Module) -> OnnxExportSpec:
    """``task.onnx_export_spec()``; a clear error for tasks that have no ONNX export yet."""
    hook = getattr(task, "onnx_export_spec", None)
    if not callable(hook):
        raise NotImplementedError(
            f"{type(task).__name__} has no ONNX export: give it an onnx_export_spec() method returning a "
            "focalnet_pl.export.OnnxExportSpec (module, example inputs, names, dynamic axes)"
        )
    spec = hook()
    if len(spec.input_names) != len(spec.example_inputs) or len(spec.dynamic_axes) != len(spec.example_inputs):
        raise ValueError(f"{type(task).__name__}.onnx_export_spec(): one input name and one dynamic_axes entry "
                         f"per example input ({len(spec.example_inputs)})")
    return spec


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)


def compare_onnx_with_torch(path: str | Path, spec: OnnxExportSpec) -> float:
    """Largest absolute difference between onnxruntime (CPU) running ``path`` and PyTorch running
    ``spec.module``, over every output of the example and check inputs."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for inputs in [spec.example_inputs, *spec.check_inputs]:
        with torch.no_grad():
            expected = _as_tuple(spec.module(*inputs))
        feeds = {name: tensor.numpy() for name, tensor in zip(spec.input_names, inputs)}
        got = session.run(spec.output_names, feeds)
        for name, want, have in zip(spec.output_names, expected, got):
            if tuple(want.shape) != have.shape:
                raise ValueError(f"ONNX output {name!r} has shape {have.shape} for inputs "
                                 f"{[tuple(t.shape) for t in inputs]}; PyTorch gives {tuple(want.shape)}")
            if want.numel():
                worst = max(worst, float(np.abs(want.numpy().astype(np.float64) - have).max()))
    return worst


def export_onnx(task: nn.Module, output: str | Path, *, config: dict[str, Any] | None = None,
                source: str | None = None, tolerance: float = ONNX_TOLERANCE) -> tuple[Path, float]:
    """Write ``task`` (through its ``onnx_export_spec()``) as an ONNX model and check it.

    The graph is traced by ``torch.export`` with the spec's dynamic axes (the CPU fast paths of
    :mod:`focalnet_pl.cpu_fastpath` step aside: the plain PyTorch ops are what ONNX represents).
    onnxruntime then runs the file on the example and check inputs; the largest absolute difference
    from PyTorch is returned, and a difference above ``tolerance`` raises (the file stays, for inspection).
    """
    try:
        import onnx  # noqa: F401 - torch.onnx needs onnx and onnxscript; the check needs onnxruntime
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime ({error}): "
                          "pip install 'focalnet-pl[onnx]'") from error
    output = Path(output)
    if output.suffix != ".onnx":
        raise ValueError(f"output must end in .onnx, got {output}")
    spec = onnx_export_spec(task)
    spec.module.eval()
    dynamic_shapes = tuple(dict(axes) for axes in spec.dynamic_axes)
    with cpu_fastpath.disabled(), torch.no_grad():
        program = torch.onnx.export(
            spec.module, spec.example_inputs, dynamo=True, input_names=spec.input_names,
            output_names=spec.output_names, dynamic_shapes=dynamic_shapes, verbose=False,
        )
    program.model.metadata_props.update(_string_metadata(_run_info(task, config, source)) | spec.metadata)
    output.parent.mkdir(parents=True, exist_ok=True)
    program.save(output)  # weights in the file, or next to it (.data) above protobuf's 2 GB
    difference = compare_onnx_with_torch(output, spec)
    shapes = [tuple(t.shape) for inputs in [spec.example_inputs, *spec.check_inputs] for t in inputs[:1]]
    log.info("Wrote %s; onnxruntime vs PyTorch: max abs difference %.3g on inputs %s", output, difference, shapes)
    if not difference <= tolerance:
        raise ValueError(f"{output}: onnxruntime differs from PyTorch by {difference:.3g} (> {tolerance:g}) on inputs {shapes}")
    return output, difference


def main(argv: list[str]) -> None:
    """``cli.py export --config X --ckpt_path Y --output Z [--format safetensors|onnx] [--part backbone|model]``."""
    parser = argparse.ArgumentParser(prog="cli.py export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's YAML config (gives the task class)")
    parser.add_argument("--ckpt_path", required=True,
                        help="Lightning checkpoint (.ckpt), or best / last: the newest run of --config")
    parser.add_argument("--output", required=True,
                        help="output .safetensors file (a .yaml sidecar is written too) or .onnx file")
    parser.add_argument("--format", choices=("safetensors", "onnx"), default="safetensors")
    parser.add_argument("--part", choices=("backbone", "model"), default=None,
                        help="safetensors only: the FocalNet backbone (default) or the whole task state_dict")
    parser.add_argument("--tolerance", type=float, default=ONNX_TOLERANCE,
                        help="onnx only: largest onnxruntime vs PyTorch difference accepted")
    args = parser.parse_args(argv)
    if args.format == "onnx" and args.part is not None:
        parser.error("--part applies to --format safetensors (ONNX exports what the task's onnx_export_spec() gives)")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("focalnet_pl").setLevel(logging.INFO)  # not the exporter's and optimizer's INFO chatter
    config = read_config(args.config)
    ckpt_path = args.ckpt_path
    if ckpt_path in CHECKPOINT_ALIASES:
        ckpt_path = str(resolve_checkpoint_alias(run_root(config.get("trainer") or {}), ckpt_path))
    task = load_task(config, ckpt_path)
    if args.format == "onnx":
        try:
            path, difference = export_onnx(task, args.output, config=config, source=ckpt_path, tolerance=args.tolerance)
        except NotImplementedError as error:  # the task's model has no ONNX graph: say why, no traceback
            parser.exit(1, f"error: {error}\n")
        print(f"wrote {path} (onnxruntime vs PyTorch: max abs difference {difference:.3g})")
        return
    path = export_weights(task, args.output, args.part or "backbone", config=config, source=ckpt_path)
    print(f"wrote {path} and {path.with_suffix('.yaml')}")

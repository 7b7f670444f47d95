"""Shared CLI helpers: resolving ``--model`` and its example inputs, reading data files, checking option values.

No file read here can run code: tensors come from safetensors or ``torch.load(weights_only=True)`` (which
refuses pickled objects), and a ``package.module:factory`` is imported only because the user named it on the
command line.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from ..artifact.base import checked_model, diffusers_class, import_factory, load_diffusers_model
from ..errors import ArtifactError, ConfigError

#: safetensors metadata key holding a file's non-tensor keyword arguments as JSON (e.g. ``{"return_dict": false}``)
CONSTANTS_KEY = "elastic_compile.constants"


def load_tensor_file(path: str, what: str) -> Any:
    """What a ``.safetensors`` file or a ``torch.save`` file of plain values holds, loaded without unpickling
    objects. A safetensors file gives a dict of its tensors plus the JSON constants in its metadata."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{what} as an existing file", f"{path} (no such file)", "Check the path.")
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt") as handle:
                values = {key: handle.get_tensor(key) for key in handle.keys()}
                constants = json.loads((handle.metadata() or {}).get(CONSTANTS_KEY, "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"{what} as a readable safetensors file", f"{path}: {type(exc).__name__}: {exc}",
                              "The file is truncated or corrupt; write it again.") from exc
        if not isinstance(constants, dict):
            raise ConfigError(f"{CONSTANTS_KEY} metadata of {path} as a JSON object", repr(constants), "Write it again.")
        return {**constants, **values}
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises UnpicklingError, RuntimeError, EOFError, ... for what it refuses
        raise ConfigError(f"{what} as tensors: a .safetensors file, or torch.save of dicts / lists of tensors and "
                          "plain values (loaded with weights_only=True, which never runs code)",
                          f"{path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                          "Save the tensors with safetensors (or torch.save of a plain dict); elastic_compile does "
                          "not unpickle objects, which could run any code.") from exc


def resolve_model(spec: str, inputs_path: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load ``--model``: ``package.module:factory`` or a diffusers model directory (``from_pretrained``).

    A factory returns a model, ``(model, example_inputs)`` or a tuple starting with the model (such as
    ``elastic_compile.reference:load_reference``'s ``(model, scheduler, config)``). Example inputs come from
    ``--inputs`` (a ``torch.save``'d dict of keyword arguments), else from the factory, else, for
    class-conditional diffusers DiT models, are synthesised from the model config. Returns ``(model in eval mode, example_inputs or None)``.
    """
    inputs = load_tensor_file(inputs_path, "--inputs") if inputs_path else None
    if inputs is not None and not isinstance(inputs, (dict, list, tuple)):
        raise ConfigError("--inputs holding the model's keyword arguments (a dict) or positional ones (a list)",
                          f"a {type(inputs).__name__}", "Save a dict of keyword arguments.")
    if ":" in spec and not Path(spec).exists():
        made = import_factory(spec)()
        model = checked_model(made, spec)
        if inputs is None and isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], (dict, tuple, list)):
            inputs = made[1]
        return model.eval(), inputs if inputs is not None else synthesize_dit_inputs(model)
    directory = Path(spec)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError("--model as package.module:factory or a diffusers model directory with config.json",
                          spec, "Pass e.g. elastic_compile/assets/reference/transformer.")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
        model = load_diffusers_model(diffusers_class(class_name, where=str(config_file)), directory)
    except (ValueError, OSError, AttributeError, ArtifactError) as exc:
        raise ConfigError(f"--model {spec}: a diffusers model folder (config.json naming a diffusers model class, "
                          "safetensors weights)", f"{type(exc).__name__}: {str(exc)[:300].rstrip('.')}",
                          "Use a package.module:factory spec for non-diffusers models.") from exc
    if inputs is None:
        inputs = synthesize_dit_inputs(model)
    return model, inputs


def load_scheduler(directory: Path, class_name: str | None = None):
    """A diffusers scheduler folder; its class (``class_name``, else the folder's ``_class_name``) is looked up
    among diffusers' schedulers only."""
    config_file = directory / "scheduler_config.json"
    try:
        name = class_name or json.loads(config_file.read_text()).get("_class_name")
        return diffusers_class(name, "SchedulerMixin", str(config_file)).from_pretrained(str(directory))
    except (ValueError, OSError, AttributeError, ArtifactError) as exc:
        raise ConfigError(f"a diffusers scheduler folder at {directory}",
                          f"{type(exc).__name__}: {str(exc)[:300].rstrip('.')}",
                          "Pass a scheduler folder (--scheduler / --sampling DIR).") from exc


def synthesize_dit_inputs(model: torch.nn.Module, batch: int = 2) -> dict | None:
    """Example inputs for class-conditional diffusers DiT models (DiTTransformer2DModel); None for others."""
    config = getattr(model, "config", None)
    if config is None or type(model).__name__ != "DiTTransformer2DModel":
        return None
    size, channels = config.sample_size, config.in_channels
    return dict(hidden_states=torch.randn(batch, channels, size, size), timestep=torch.linspace(100, 900, batch),
                class_labels=torch.arange(batch) % max(1, config.num_embeds_ada_norm), return_dict=False)


def parse_floats(text: str, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} as comma-separated numbers", text, "E.g. 0.25,0.5,0.75,1") from exc
    if not values or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} as finite numbers", text, "E.g. 0.25,0.5,0.75,1")
    return values


def parse_ints(text: str, name: str, low: int | None = None) -> tuple[int, ...]:
    """Comma-separated whole numbers (``1.7`` is an error, not 1), each >= ``low`` when given."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} as comma-separated whole numbers", text, "E.g. 0,1,2") from exc
    if not values or (low is not None and min(values) < low):
        raise ConfigError(f"{name} as whole numbers" + (f" >= {low}" if low is not None else ""), text, "E.g. 0,1,2")
    return values


def require(value, name: str, low: float | None = None, high: float | None = None, *, allow_none: bool = True):
    """``value`` of an option when it is finite and within [low, high] (None passes when ``allow_none``)."""
    if value is None and allow_none:
        return value
    if value is None or not math.isfinite(value) or (low is not None and value < low) or \
            (high is not None and value > high):
        bounds = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ConfigError(f"{name} in {bounds}", f"{value}", f"Pass a {name} within those bounds.")
    return value


def writable_output(path: str | os.PathLike, name: str) -> Path:
    """``path`` when its folder exists (or can be made) and is writable and it is not a directory: checked
    before any work, so a long run does not fail at its last step."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{name} in a folder that can be created", f"{path.parent}: {exc}", "Choose another path.") from exc
    if path.is_dir() or not os.access(path.parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{name} as a file path in a writable folder", f"{path}", "Choose another path.")
    return path


def load_pipeline(directory: Path):
    """A diffusers pipeline folder (``model_index.json``), safetensors weights only."""
    from diffusers import DiffusionPipeline

    if not (directory / "model_index.json").is_file():
        raise ConfigError("--pipeline as a diffusers pipeline directory (save_pretrained, with model_index.json)",
                          f"{directory}", "Pass the folder a pipeline's save_pretrained wrote.")
    try:
        pipe = DiffusionPipeline.from_pretrained(directory, use_safetensors=True)
    except (ValueError, OSError, AttributeError, TypeError) as exc:
        raise ConfigError(f"--pipeline {directory}: a loadable diffusers pipeline with safetensors weights",
                          f"{type(exc).__name__}: {str(exc)[:300]}", "Check the folder with "
                          "DiffusionPipeline.from_pretrained(folder, use_safetensors=True).") from exc
    if not hasattr(pipe, "transformer"):
        raise ConfigError("a pipeline with a .transformer", f"{type(pipe).__name__}",
                          "Record trajectories of a DiT pipeline (a transformer denoiser).")
    return pipe


def parse_call(text: str) -> dict:
    """``--call``: more keyword arguments of every pipeline call, as a JSON object."""
    try:
        extra = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError("--call as a JSON object", f"{text!r} ({exc.msg})",
                          "Write e.g. --call '{\"max_sequence_length\": 256}'.") from None
    if not isinstance(extra, dict):
        raise ConfigError("--call as a JSON object", f"a JSON {type(extra).__name__}",
                          "Write e.g. --call '{\"max_sequence_length\": 256}'.")
    return extra


def parse_resolution(text: str | None) -> dict:
    """``--resolution HEIGHTxWIDTH`` -> the pipeline's ``height`` and ``width`` ({} when absent)."""
    if text is None:
        return {}
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ConfigError("--resolution as HEIGHTxWIDTH in pixels", repr(text), "E.g. --resolution 1024x768.")
    return {"height": int(parts[0]), "width": int(parts[1])}

"""Shared CLI helpers: resolving ``--model`` and its example inputs, parsing lists."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError


def resolve_model(spec: str, inputs_path: str | None = None) -> tuple[torch.nn.Module, Any]:
    """Load ``--model``: ``package.module:factory`` or a diffusers model directory (``from_pretrained``).

    A factory returns a model, ``(model, example_inputs)`` or a tuple starting with the model (such as
    ``elastic_compile.reference:load_reference``'s ``(model, scheduler, config)``). Example inputs come from
    ``--inputs`` (a ``torch.save``'d dict of keyword arguments), else from the factory, else, for
    class-conditional diffusers DiT models, are synthesised from the model config. Returns ``(model in eval mode, example_inputs or None)``.
    """
    inputs = torch.load(inputs_path, weights_only=False) if inputs_path else None
    if ":" in spec and not Path(spec).exists():
        module_name, _, attribute = spec.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ConfigError("--model as package.module:factory or a diffusers model directory", spec,
                              f"Check the import path ({exc}).") from exc
        made = factory()
        model = made[0] if isinstance(made, tuple) else made
        if inputs is None and isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], (dict, tuple, list)):
            inputs = made[1]
        return model.eval(), inputs if inputs is not None else synthesize_dit_inputs(model)
    directory = Path(spec)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise ConfigError("--model as package.module:factory or a diffusers model directory with config.json",
                          spec, "Pass e.g. elastic_compile/assets/reference/transformer.")
    class_name = json.loads(config_file.read_text()).get("_class_name")
    import diffusers
    model_class = getattr(diffusers, class_name or "", None)
    if model_class is None:
        raise ConfigError("a diffusers model class in config.json", f"_class_name={class_name!r}",
                          "Use a package.module:factory spec for non-diffusers models.")
    from ..artifact.base import load_diffusers_model
    model = load_diffusers_model(model_class, directory)
    if inputs is None:
        inputs = synthesize_dit_inputs(model)
    return model, inputs


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
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{name} as comma-separated numbers", text, "E.g. 0.25,0.5,0.75,1") from exc

"""The base model inside an export, so a runtime can rebuild it from the artifact alone.

``base/`` holds the *unmodified-layout* base weights: the elastic model's current weights with the FFN unit
permutations undone and router parameters left out, so that ``elastic_compile.load(base, "elastic/")``
(which re-applies the permutations) reproduces the exported elastic model exactly.

* diffusers ``ModelMixin`` models: a regular diffusers folder (``config.json`` +
  ``diffusion_pytorch_model*.safetensors``), loadable with ``<Class>.from_pretrained("base")`` by anyone;
* other models: ``model*.safetensors`` plus ``factory.json`` naming a ``package.module:factory`` that builds
  the architecture (its own weights are then replaced by the saved ones).
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError
from ..state import ROUTER_ATTRIBUTE, ElasticState

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model{suffix}.safetensors"
FACTORY_FILE = "factory.json"


def is_diffusers_model(model: nn.Module) -> bool:
    try:
        from diffusers import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(model, ModelMixin)


def base_state_dict(model: nn.Module, state: ElasticState) -> dict[str, torch.Tensor]:
    """Current weights without routers, with the permutation of every still-elastic FFN site undone."""
    sd = {k: v.detach() for k, v in model.state_dict().items() if f".{ROUTER_ATTRIBUTE}." not in f".{k}"}
    for spec in state.specs:
        for site in spec.sites:
            order = [int(i) for i in state.permutations[(spec.index, site.name)]]
            for piece in site.all_slices():
                key = f"{spec.path}.{piece.param}"
                value = sd[key]
                index = torch.tensor(piece.permutation(order, value.shape[piece.dim]))
                sd[key] = value.index_select(piece.dim, torch.argsort(index).to(value.device))
    return sd


def save_base(model: nn.Module, state: ElasticState, directory: Path, factory: str | None) -> dict:
    """Write the base model to ``directory``; returns its manifest entry."""
    from huggingface_hub import save_torch_state_dict

    directory.mkdir(parents=True, exist_ok=True)
    sd = {k: v.cpu() for k, v in base_state_dict(model, state).items()}
    if is_diffusers_model(model):
        model.save_config(str(directory))
        save_torch_state_dict(sd, str(directory), filename_pattern=DIFFUSERS_WEIGHTS)
        return {"kind": "diffusers", "path": directory.name, "class": type(model).__name__}
    if not factory:
        raise ConfigError("base_factory='package.module:factory' for a model that is not a diffusers ModelMixin",
                          f"a {type(model).__name__} and no factory",
                          "Pass base_factory (a function building the architecture; its weights are replaced).")
    save_torch_state_dict(sd, str(directory))
    (directory / FACTORY_FILE).write_text(json.dumps({"factory": factory}))
    return {"kind": "factory", "path": directory.name, "factory": factory, "class": type(model).__name__}


def call_factory(spec: str) -> nn.Module:
    """Build a model from ``package.module:factory`` (a factory may return ``(model, example_inputs)``)."""
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ArtifactError(f"an importable base factory {spec!r}", f"{type(exc).__name__}: {exc}",
                            "Make the factory importable (PYTHONPATH) on this machine.") from exc
    made = factory()
    return made[0] if isinstance(made, tuple) else made


def load_diffusers_model(model_class, directory) -> nn.Module:
    """``model_class.from_pretrained(directory)`` (eval mode), also where ``accelerate`` is not installed: there
    the model is built from its config and its safetensors loaded into it (strict), as ``from_pretrained`` does
    without ``accelerate`` (float32 parameters) but also for models with ``_keep_in_fp32_modules`` (e.g. Wan),
    which ``from_pretrained`` refuses to load without it."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        from huggingface_hub import load_torch_model

        model = model_class.from_config(model_class.load_config(str(directory)))
        load_torch_model(model, str(directory), strict=True, filename_pattern=DIFFUSERS_WEIGHTS)
        return model.eval()
    return model_class.from_pretrained(str(directory)).eval()


def load_base(root: Path, entry: dict) -> nn.Module:
    """Rebuild the base model recorded by :func:`save_base` (eval mode)."""
    directory = root / entry["path"]
    if entry["kind"] == "diffusers":
        import diffusers

        model_class = getattr(diffusers, entry["class"], None)
        if model_class is None:
            raise ArtifactError(f"diffusers class {entry['class']}", "not in this diffusers version",
                                "Install the diffusers version the artifact was exported with.")
        return load_diffusers_model(model_class, directory)
    if entry["kind"] == "factory":
        from huggingface_hub import load_torch_model

        model = call_factory(entry["factory"])
        load_torch_model(model, str(directory), strict=True)
        return model.eval()
    raise ArtifactError("base kind 'diffusers' or 'factory'", repr(entry.get("kind")), "Export again.")

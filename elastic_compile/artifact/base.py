"""The base model inside an export, so a runtime can rebuild it from the artifact alone.

``base/`` holds the *unmodified-layout* base weights: the elastic model's current weights with the FFN unit
permutations undone and router parameters left out, so that ``elastic_compile.load(base, "elastic/")``
(which re-applies the permutations) reproduces the exported elastic model exactly.

* diffusers ``ModelMixin`` models: a regular diffusers folder (``config.json`` +
  ``diffusion_pytorch_model*.safetensors``), loadable with ``<Class>.from_pretrained("base")`` by anyone;
* other models: ``model*.safetensors`` plus ``factory.json`` naming a ``package.module:factory`` that builds
  the architecture (its own weights are then replaced by the saved ones).

Nothing in an artifact is ever imported or run: the factory a manifest names is only shown to the user, who
passes the architecture to :func:`load_base` (``base=``: a model, a callable, or the factory's name, which is
then code the user chose to run); a diffusers class is looked up among diffusers' own model classes only; all
weights are read from safetensors files.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from ..errors import ArtifactError, ConfigError, ModelMismatchError
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


def import_factory(spec: str):
    """The function ``package.module:factory`` names. Only for names the user gave (command line, Python): never
    for a name read from a file."""
    module_name, _, attribute = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"an importable factory {spec!r} (package.module:factory)", f"{type(exc).__name__}: {exc}",
                          "Make the factory importable (PYTHONPATH) on this machine.") from exc
    if not callable(factory):
        raise ConfigError(f"{spec} naming a function that builds the model", f"a {type(factory).__name__}",
                          "Name a function returning an nn.Module (or (module, example_inputs)).")
    return factory


def call_factory(spec: str) -> nn.Module:
    """Build a model from ``package.module:factory`` (a factory may return ``(model, example_inputs)``)."""
    return built_model(import_factory(spec), spec)


def built_model(factory, name: str) -> nn.Module:
    """The model ``factory()`` returns (alone, or first of ``(model, example_inputs)``), checked to be a module."""
    return checked_model(factory() if callable(factory) else factory, name)


def checked_model(made, name: str) -> nn.Module:
    """``made`` (a model or ``(model, example_inputs)``)'s model; ConfigError when it is not an nn.Module."""
    model = made[0] if isinstance(made, tuple) and made else made
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{name}() to return a torch.nn.Module (or (module, example_inputs))",
                          f"a {type(model).__name__}", "Name a function that builds the model.")
    return model


def diffusers_class(name, kind: str = "ModelMixin", where: str = "the artifact"):
    """The class ``diffusers.<name>`` when it is one of diffusers' ``kind`` classes (models or schedulers), else
    ArtifactError: a name read from a file only ever selects among them."""
    import diffusers

    base = getattr(diffusers, kind)
    value = getattr(diffusers, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(value, type) and issubclass(value, base)):
        raise ArtifactError(f"a diffusers {kind} class name in {where}", repr(name),
                            "Install the diffusers version it was written with, or write it again.")
    return value


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
        load_torch_model(model, str(directory), strict=True, safe=True, filename_pattern=DIFFUSERS_WEIGHTS)
        return model.eval()
    return model_class.from_pretrained(str(directory), use_safetensors=True).eval()


def load_base(root: Path, entry: dict, base=None) -> nn.Module:
    """Rebuild the base model recorded by :func:`save_base` (eval mode).

    ``base``: the user's architecture for it: an ``nn.Module`` (its weights are replaced), a function building
    one, or a ``package.module:factory`` name. Needed for a "factory" base (the factory named in the artifact
    is never imported from there); optional for a diffusers base."""
    from huggingface_hub import load_torch_model

    directory = root / entry["path"]
    if base is None and entry["kind"] == "factory":
        factory = entry.get("factory")
        raise ConfigError(f"the architecture of {root}'s base model, from you: it was exported from the factory "
                          f"{factory!r}, which elastic_compile does not import on an artifact's word",
                          "none given",
                          f"If you trust that code, pass base_factory={factory!r} (ec.runtime.load) or --model "
                          f"{factory} (elastic-compile run); or pass base_model=<a model of that class>.")
    if base is None:
        try:
            return load_diffusers_model(diffusers_class(entry["class"], where=str(root / "manifest.json")), directory)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise ArtifactError(f"a diffusers model folder at {directory}", f"{type(exc).__name__}: {str(exc)[:200]}",
                                "The artifact is incomplete or corrupt; export again.") from exc
    model = call_factory(base) if isinstance(base, str) else base if isinstance(base, nn.Module) else \
        built_model(base, getattr(base, "__name__", "base_factory"))
    try:
        load_torch_model(model, str(directory), strict=True, safe=True,
                         filename_pattern=DIFFUSERS_WEIGHTS if entry["kind"] == "diffusers" else None)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelMismatchError(f"a model whose parameters match the base weights in {directory}",
                                 f"a {type(model).__name__}: {str(exc).splitlines()[0][:200]}",
                                 "Pass the architecture the export was made from.") from exc
    return model.eval()

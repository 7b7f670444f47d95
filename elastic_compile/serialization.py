"""``save`` / ``load``: an elastic model as a small artifact (config, analysis, permutations, routers).

Layout of an artifact directory::

    elastic.json               format, config, block specs (FFN sites, residual map, router inputs), fingerprint
    permutations.safetensors   per block and FFN site: the unit order applied to the base weights
    routers.safetensors        router weights, keys "<block index>.<parameter>"
    base_weights.safetensors   only when saved with include_base_weights (base fine-tuned with the routers)

``load(fresh_base_model, path)`` re-applies it to an unmodified base model without running any analysis (no
example inputs needed). Saving writes a temporary directory and renames it into place, so an interrupted save
never leaves a half-written artifact behind.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .analysis.spec import BlockSpec
from .artifact.files import read_manifest_json, staging_directory
from .config import ElasticConfig
from .errors import AlreadyElasticError, ArtifactError, ModelMismatchError
from .passes import apply_unit_permutation, install
from .report import model_fingerprint
from .state import STATE_ATTRIBUTE, ElasticState, state_of
from .version import __version__

FORMAT = "elastic_compile.artifact/1"
MANIFEST, PERMUTATIONS, ROUTERS = "elastic.json", "permutations.safetensors", "routers.safetensors"
BASE_WEIGHTS = "base_weights.safetensors"


def save(model: nn.Module, path: str | os.PathLike, *, include_base_weights: bool = False) -> Path:
    """Write ``model``'s elastic artifact to directory ``path`` (replaced atomically if it exists).

    ``include_base_weights`` also stores the (permuted) base weights, for models whose base was fine-tuned
    together with the routers; ``load`` then puts them on the fresh base model.
    """
    state = state_of(model)
    path = Path(path)
    manifest = {
        "format": FORMAT,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "fingerprint": state.fingerprint,
        "config": state.config.to_dict(),
        "blocks": [spec.to_dict() for spec in state.specs],
        "base_weights": include_base_weights,
        "serving": state.serving,
        "versions": {"torch": torch.__version__, __package__: __version__},
    }
    permutations = {f"{index}.{site}": order.to(torch.int64).contiguous()
                    for (index, site), order in state.permutations.items()}
    routers = {f"{index}.{name}": value.detach().cpu().contiguous()
               for index, router in state.routers.items() for name, value in router.state_dict().items()}
    with staging_directory(path) as staging:
        save_file(permutations, str(staging / PERMUTATIONS))
        save_file(routers, str(staging / ROUTERS))
        if include_base_weights:
            base = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()
                    if ".elastic_router." not in f".{name}"}
            save_file(base, str(staging / BASE_WEIGHTS))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return path


def load(base_model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Make ``base_model`` (unmodified, same weights as at transform time) elastic from an artifact.

    ``strict=False`` accepts base weights whose fingerprint differs (e.g. a fine-tuned copy): neuron ordering
    stays function-preserving, but the routers were trained for the original weights.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if hasattr(base_model, STATE_ATTRIBUTE):
        raise AlreadyElasticError("an unmodified base model", "a model that is already elastic",
                                  "Load into a fresh instance of the base model.")
    fingerprint = model_fingerprint(base_model)
    if strict and fingerprint != manifest["fingerprint"]:
        raise ModelMismatchError(f"the base weights the artifact was made from ({manifest['fingerprint'][:12]}...)",
                                 f"weights with fingerprint {fingerprint[:12]}...",
                                 "Load the same checkpoint, or pass strict=False to accept other weights.")
    config = ElasticConfig.from_dict(manifest["config"])
    specs = [BlockSpec.from_dict(b) for b in manifest["blocks"]]
    blocks = [_block_for(base_model, spec) for spec in specs]
    permutations_file = load_file(str(path / PERMUTATIONS))
    permutations = {}
    for spec, block in zip(specs, blocks):
        for site in spec.sites:
            key = f"{spec.index}.{site.name}"
            if key not in permutations_file:
                raise ArtifactError(f"a permutation for {key}", "none", "The artifact is incomplete; save it again.")
            order = permutations_file[key]
            apply_unit_permutation(block, site, order)
            permutations[(spec.index, site.name)] = order
    state = ElasticState(config=config, specs=specs)
    state.fingerprint = manifest["fingerprint"]
    state.serving = dict(manifest.get("serving", {}))
    install(base_model, state, blocks, permutations)
    _load_routers(state, load_file(str(path / ROUTERS)))
    if manifest.get("base_weights"):
        if not (path / BASE_WEIGHTS).is_file():
            raise ArtifactError(f"{BASE_WEIGHTS} in {path}", "it is missing", "The artifact is incomplete; save it again.")
        missing, unexpected = base_model.load_state_dict(load_file(str(path / BASE_WEIGHTS)), strict=False)
        if unexpected or [m for m in missing if ".elastic_router." not in f".{m}"]:
            raise ArtifactError("base weights matching the model", f"{len(missing)} missing, {len(unexpected)} unexpected",
                                "Load the artifact into the model class it was made from.")
    return base_model


def _read_manifest(path: Path) -> dict:
    manifest = read_manifest_json(path / MANIFEST, FORMAT, "elastic_compile.save", "save it again")
    for name in (PERMUTATIONS, ROUTERS):
        if not (path / name).is_file():
            raise ArtifactError(f"{name} in {path}", "it is missing", "The artifact is incomplete; save it again.")
    return manifest


def _block_for(model: nn.Module, spec: BlockSpec) -> nn.Module:
    try:
        block = model.get_submodule(spec.path)
    except AttributeError:
        block = None
    if block is None or type(block).__name__ != spec.class_name:
        found = type(block).__name__ if block is not None else "nothing"
        raise ModelMismatchError(f"a {spec.class_name} at {spec.path}", found,
                                 "Load the artifact into the same model class it was made from.")
    return block


def _load_routers(state: ElasticState, tensors: dict[str, torch.Tensor]) -> None:
    expected = {f"{i}.{n}" for i, r in state.routers.items() for n in r.state_dict()}
    if set(tensors) != expected:
        raise ArtifactError("router weights for exactly the routers of this model",
                            f"{len(set(tensors) ^ expected)} mismatching keys", "Save the artifact again.")
    for index, router in state.routers.items():
        prefix = f"{index}."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            router.load_state_dict(weights)
        except RuntimeError as exc:
            raise ArtifactError("router weights of matching shapes", str(exc).splitlines()[0],
                                "The artifact was made with another config; save it again.") from exc

"""``save`` / ``load``: an elastic model as a small artifact (config, analysis, permutations, routers).

Layout of an artifact directory (the format: :mod:`elastic_compile.artifact.saved`)::

    elastic.json               format, config, block specs (FFN sites, residual map, router inputs), fingerprints,
                               the sha256 of every other file and of its own content
    permutations.safetensors   per block and FFN site: the unit order applied to the base weights
    routers.safetensors        router weights, keys "<block index>.<parameter>"
    base_weights.safetensors   only when saved with include_base_weights (base fine-tuned with the routers)

``load(fresh_base_model, path)`` re-applies it to an unmodified base model without running any analysis (no
example inputs needed), after checking every byte against the hashes and every value against the model (see
:mod:`elastic_compile.artifact.saved`). Saving stages the files beside ``path`` and renames them into place (see
:mod:`elastic_compile.artifact.commit`), so an interrupted save leaves the previous artifact or the new one, and
the next save or load cleans up after it.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .analysis.spec import BlockSpec
from .artifact.commit import staging_directory
from .artifact.files import read_manifest_json, write_json_atomic
from .artifact.integrity import check_files, load_tensors
from .artifact.manifest import hash_tree
from .artifact.saved import (BASE_WEIGHTS, FORMAT, MANIFEST, PERMUTATIONS, REMEDY, ROUTERS, check_block_entry,
                             check_finite, check_model_fits, check_permutation, check_site, check_site_modules, check_spec,
                             check_spec_fits, is_saved_artifact, spec_error, structure_fingerprint, validate_saved)
from .config import ElasticConfig
from .errors import AlreadyElasticError, ArtifactError, ConfigError, ModelMismatchError
from .offloading import refuse_offloaded
from .passes import apply_unit_permutation, install
from .pretrained import ELASTIC_SUBFOLDER, install_save_pretrained
from .report import model_fingerprint
from .serving import restore_serving
from .state import STATE_ATTRIBUTE, ElasticState, state_of
from .version import __version__


def save(model: nn.Module, path: str | os.PathLike, *, include_base_weights: bool = False,
         overwrite: bool = False) -> Path:
    """Write ``model``'s elastic artifact to directory ``path``, replacing a previous artifact there atomically.

    ``include_base_weights`` also stores the (permuted) base weights, for models whose base was fine-tuned
    together with the routers; ``load`` then puts them on the fresh base model. A regular file at ``path`` is
    never replaced, nor a non-empty directory that is not a previous artifact unless ``overwrite=True`` (which
    deletes what it holds); both raise DestinationError.
    """
    state = state_of(model)
    path = Path(path)
    manifest = {
        "format": FORMAT,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "fingerprint": state.fingerprint,
        "fingerprint_order": "ordered",  # the fingerprints see the order of values (report.model_fingerprint)
        "permuted_fingerprint": model_fingerprint(model),  # the base weights as reordered here
        "structure": structure_fingerprint(model),
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
    with staging_directory(path, overwrite=overwrite, previous=is_saved_artifact) as staging:
        save_file(permutations, str(staging / PERMUTATIONS))
        save_file(routers, str(staging / ROUTERS))
        if include_base_weights:
            base = {name: value.detach().cpu().contiguous() for name, value in model.state_dict().items()
                    if ".elastic_router." not in f".{name}"}
            save_file(base, str(staging / BASE_WEIGHTS))
        manifest["files"] = hash_tree(staging)
        write_json_atomic(staging / MANIFEST, manifest)  # last: a directory without it is not an artifact
    return path


def load(base_model: nn.Module, path: str | os.PathLike, *, strict: bool = True, cache: str = "auto") -> nn.Module:
    """Make ``base_model`` (unmodified, same weights as at transform time) elastic from an artifact.

    ``cache``: "auto" (default) serves the model as its routers were trained: an artifact recording a feature
    cache (routers trained cache-aware) comes back with that cache on, usable from a plain sampling loop (see
    :mod:`elastic_compile.serving`); "off" leaves the cache off (``apply_feature_cache`` turns it on later).

    ``strict=False`` accepts base weights whose fingerprint differs (e.g. a fine-tuned copy): neuron ordering
    stays function-preserving, but the routers were trained for the original weights. The architecture
    (parameter names and shapes) must match either way. Every file is checked against its hash and every value
    against the model before the model is touched: errors are ArtifactError (the artifact) or ModelMismatchError
    (the model). Everything but the router weights' shapes is checked before the model is rewritten, so those
    errors leave it unmodified.
    """
    if cache not in ("auto", "off"):
        raise ConfigError("cache in ('auto', 'off')", repr(cache),
                          "Use 'auto' (serve as trained) or 'off' (no feature cache).")
    path = Path(path)
    file = path / MANIFEST
    manifest = read_manifest_json(file, FORMAT, "elastic_compile.save", REMEDY)
    check_files(path, manifest, MANIFEST, REMEDY)
    validate_saved(manifest, file)
    if hasattr(base_model, STATE_ATTRIBUTE):
        raise AlreadyElasticError("an unmodified base model", "a model that is already elastic",
                                  "Load into a fresh instance of the base model.")
    refuse_offloaded(base_model, "elastic_compile.load")
    check_model_fits(base_model, manifest, file)
    ordered = manifest.get("fingerprint_order") == "ordered"  # else: written before fingerprints saw order
    fingerprint = model_fingerprint(base_model, ordered=ordered)
    # a base already in the artifact's order (e.g. an elastic model's weights written by a plain state-dict
    # save and loaded back) is used as it is: reordering it again would scramble its FFNs
    already_ordered = ordered and fingerprint == manifest.get("permuted_fingerprint") != manifest["fingerprint"]
    original = fingerprint if ordered else model_fingerprint(base_model)
    if strict and fingerprint != manifest["fingerprint"] and not already_ordered:
        raise ModelMismatchError(f"the base weights the artifact was made from ({manifest['fingerprint'][:12]}...)",
                                 f"weights with fingerprint {fingerprint[:12]}...",
                                 "Load the same checkpoint, or pass strict=False to accept other weights.")
    try:
        config = ElasticConfig.from_dict(manifest["config"])
    except (ConfigError, TypeError) as exc:
        raise ArtifactError(f"a valid config in {file}", str(exc), f"The artifact is corrupt; {REMEDY}.") from exc
    for position, entry in enumerate(manifest["blocks"]):
        check_block_entry(entry, position, file)
    try:
        specs = [BlockSpec.from_dict(b) for b in manifest["blocks"]]
    except (KeyError, TypeError, ValueError) as exc:  # e.g. an unknown field
        raise spec_error(file, exc) from exc
    for position, spec in enumerate(specs):
        check_spec(spec, position, file)
    blocks = [_block_for(base_model, spec) for spec in specs]
    for spec, block in zip(specs, blocks):
        check_spec_fits(block, spec, file)
    orders = _checked_permutations(path, specs, blocks)
    routers = load_tensors(path / ROUTERS)
    check_finite(routers, path / ROUTERS)
    base_weights = None
    if manifest.get("base_weights"):
        if not (path / BASE_WEIGHTS).is_file():
            raise ArtifactError(f"{BASE_WEIGHTS} in {path}", "it is missing", "The artifact is incomplete; save it again.")
        base_weights = load_tensors(path / BASE_WEIGHTS)
    # Every check passed: from here on the model is rewritten.
    for spec, block in zip(specs, blocks):
        for site in spec.sites:
            if not already_ordered:
                apply_unit_permutation(block, site, orders[(spec.index, site.name)])
    state = ElasticState(config=config, specs=specs)
    state.fingerprint = manifest["fingerprint"] if ordered else original  # what the next save records
    state.serving = dict(manifest.get("serving", {}))
    install(base_model, state, blocks, orders)
    _load_routers(state, routers, path / ROUTERS)
    if base_weights is not None:
        missing, unexpected = base_model.load_state_dict(base_weights, strict=False)
        if unexpected or [m for m in missing if ".elastic_router." not in f".{m}"]:
            raise ArtifactError("base weights matching the model", f"{len(missing)} missing, {len(unexpected)} unexpected",
                                "Load the artifact into the model class it was made from.")
    if cache == "auto":
        restore_serving(base_model)
    install_save_pretrained(base_model, save)
    return base_model


def from_pretrained(model_class, path: str | os.PathLike, *, strict: bool = True, cache: str = "auto", **kwargs):
    """``model_class.from_pretrained(path, **kwargs)`` (e.g. a diffusers ``DiTTransformer2DModel``), made elastic
    from the artifact an elastic model's ``save_pretrained`` wrote into ``path/elastic`` (see
    :mod:`elastic_compile.pretrained`). ArtifactError when ``path`` holds no such artifact."""
    path = Path(path)
    if not (path / ELASTIC_SUBFOLDER / MANIFEST).is_file():
        raise ArtifactError(f"an elastic artifact at {path / ELASTIC_SUBFOLDER}", "none",
                            "Save with the elastic model's save_pretrained (or elastic_compile.save), or load the "
                            "plain model with model_class.from_pretrained.")
    model = model_class.from_pretrained(path, **kwargs)
    return load(model, path / ELASTIC_SUBFOLDER, strict=strict, cache=cache)


def _checked_permutations(path: Path, specs: list[BlockSpec], blocks: list[nn.Module]) -> dict:
    """Per (block, site): the saved unit order, checked to be a permutation of the site's units."""
    file = path / PERMUTATIONS
    saved = load_tensors(file)
    orders = {}
    for spec, block in zip(specs, blocks):
        for site in spec.sites:
            check_site(block, spec, site, path / MANIFEST)
            check_site_modules(block, spec, site, path / MANIFEST)
            key = f"{spec.index}.{site.name}"
            if key not in saved:
                raise ArtifactError(f"a permutation for {key} in {file}", "none", "The artifact is incomplete; save it again.")
            orders[(spec.index, site.name)] = check_permutation(saved[key], site, key, file)
    return orders


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


def _load_routers(state: ElasticState, tensors: dict[str, torch.Tensor], file: Path) -> None:
    expected = {f"{i}.{n}" for i, r in state.routers.items() for n in r.state_dict()}
    if set(tensors) != expected:
        raise ArtifactError(f"router weights for exactly the routers of this model in {file}",
                            f"{len(set(tensors) ^ expected)} mismatching keys", "Save the artifact again.")
    for index, router in state.routers.items():
        prefix = f"{index}."
        weights = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            router.load_state_dict(weights)
        except RuntimeError as exc:
            raise ArtifactError(f"router weights of matching shapes in {file}", str(exc).splitlines()[0],
                                "The artifact was made with another config; save it again.") from exc

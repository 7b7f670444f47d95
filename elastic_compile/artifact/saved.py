"""The format of an ``elastic_compile.save`` artifact (``elastic.json`` + safetensors) and its checks.

``serialization.py`` writes and reads it; everything here checks a value before ``load`` uses it, so that a
corrupt, edited or mismatched artifact is an ArtifactError or ModelMismatchError naming the file, never a raw
exception in the middle of rewriting the user's model (or, worse, a model that loads and computes garbage):
permutations must be permutations of the FFN's units, every FFN site must cover its parameters exactly (a
wider model fails here, not on its first call), the model must have the architecture the artifact was made for
(a deeper one would leave blocks plain), router weights must be finite.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..capture.treespec import loaded_treespec
from ..errors import ArtifactError, ModelMismatchError
from ..state import ROUTER_ATTRIBUTE
from ..version import __version__
from .commit import written_by_us
from .validate import Checker, version_tuple

FORMAT = "elastic_compile.artifact/1"
MANIFEST, PERMUTATIONS, ROUTERS = "elastic.json", "permutations.safetensors", "routers.safetensors"
BASE_WEIGHTS = "base_weights.safetensors"
FILES = (PERMUTATIONS, ROUTERS, BASE_WEIGHTS)
REMEDY = "save it again"
CACHE_FIELDS = {"max_reuse": int, "band": (float, type(None)), "fallback": str, "forecast_min_points": int}


def is_saved_artifact(directory: Path) -> bool:
    """Whether ``directory`` is a save artifact holding nothing else (safe to replace)."""
    return written_by_us(directory, MANIFEST, FORMAT, known=FILES)


def structure_fingerprint(model: nn.Module) -> str:
    """Hash of the model's parameter names and shapes (routers left out): equal for the same architecture
    whatever its weights, which ``load(..., strict=False)`` still requires."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if f"{ROUTER_ATTRIBUTE}." not in name:
            digest.update(f"{name}|{tuple(param.shape)};".encode())
    return digest.hexdigest()


def validate_saved(manifest: dict, file: Path) -> None:
    """The JSON-level checks of ``elastic.json`` (types, versions, serving options)."""
    c = Checker(file)
    c.get(manifest, "fingerprint", str)
    if manifest.get("fingerprint_order", "ordered") != "ordered":
        c.fail("fingerprint_order", "'ordered' (or absent: an artifact of an earlier version)",
               manifest["fingerprint_order"])
    if not isinstance(manifest.get("permuted_fingerprint", ""), str):
        c.fail("permuted_fingerprint", "a fingerprint string", manifest["permuted_fingerprint"])
    c.get(manifest, "config", dict)
    c.get(manifest, "blocks", list)
    if not isinstance(manifest.get("base_weights", False), bool):
        c.fail("base_weights", "true or false", manifest["base_weights"])
    writer = c.get(manifest, "versions", dict).get("elastic_compile", __version__)
    if not isinstance(writer, str) or version_tuple(writer) is None:
        c.fail("versions.elastic_compile", "a version number", writer)
    if version_tuple(writer) > version_tuple(__version__):
        raise ArtifactError(f"an artifact written by elastic_compile <= {__version__} ({file})", f"version {writer}",
                            f"Upgrade elastic_compile to {writer} or later to load it.")
    serving = manifest.get("serving", {})
    if not isinstance(serving, dict) or set(serving) - {"feature_cache", "threshold_calibrated"}:
        c.fail("serving", "an object with at most 'feature_cache' and 'threshold_calibrated'", serving)
    calibrated = serving.get("threshold_calibrated", 0.5)
    if isinstance(calibrated, bool) or not isinstance(calibrated, (int, float)) or not math.isfinite(calibrated):
        c.fail("serving.threshold_calibrated", "a finite number (the run threshold calibration found)", calibrated)
    cache = serving.get("feature_cache")
    if cache is not None:
        if not isinstance(cache, dict) or set(cache) - set(CACHE_FIELDS):
            c.fail("serving.feature_cache", f"an object with fields among {sorted(CACHE_FIELDS)}", cache)
        for name, value in cache.items():
            if isinstance(value, bool) or not isinstance(value, CACHE_FIELDS[name]):
                c.fail(f"serving.feature_cache.{name}", "a value of the right type", value)


def check_model_fits(model: nn.Module, manifest: dict, file: Path) -> None:
    """ModelMismatchError unless ``model`` has the parameter names and shapes the artifact was made from."""
    recorded = manifest.get("structure")
    if recorded is not None and recorded != structure_fingerprint(model):
        raise ModelMismatchError(f"a model with the architecture {file} was made from (parameter names and shapes)",
                                 f"a {type(model).__name__} with other parameters (deeper, wider or another class)",
                                 "Load the artifact into the architecture it was made for; strict=False accepts "
                                 "other weight values, not other shapes.")


def check_site(block: nn.Module, spec: Any, site: Any, file: Path) -> None:
    """The FFN ``site`` of ``spec``'s block names parameters of the block whose unit dimension it covers exactly."""
    where = f"block {spec.index} ({spec.path}) FFN site {site.name!r}"
    if isinstance(site.hidden, bool) or not isinstance(site.hidden, int) or site.hidden < 1:
        raise ArtifactError(f"{where} in {file} with a positive unit count", repr(site.hidden),
                            f"{REMEDY.capitalize()}.")
    for piece in site.all_slices():
        try:
            param = block.get_parameter(piece.param)
        except (AttributeError, TypeError):
            raise ModelMismatchError(f"parameter {piece.param} of {spec.path} (from {file})", "no such parameter",
                                     "Load the artifact into the model class it was made from.") from None
        dim = piece.dim
        if isinstance(dim, bool) or not isinstance(dim, int) or not -param.ndim <= dim < param.ndim:
            raise ArtifactError(f"{where}: a dimension of {piece.param} in {file}", repr(dim), f"{REMEDY.capitalize()}.")
        size = param.shape[dim]
        bounded = all(_int_in(s, 0, size - site.hidden) for s in piece.unit_starts) and all(
            isinstance(r, tuple) and len(r) == 2 and _int_in(r[0], 0, size) and _int_in(r[1], r[0], size)
            for r in piece.keep)
        if not bounded or piece.indices(site.hidden) != list(range(size)):
            raise ModelMismatchError(f"{where}: {piece.param} with {site.hidden} units in dimension {dim} (from {file})",
                                     f"size {size}", "Load the artifact into the model (width) it was made for.")


def check_site_modules(block: nn.Module, spec: Any, site: Any, file: Path) -> None:
    """Every parameter of a module holding the site's units by rows (an in-projection, a per-unit op) is sliced
    with them: a bias left out would keep the dense width and break the narrow ones."""
    listed = {piece.param for piece in site.in_projections}
    for name in {piece.module for piece in site.in_projections}:
        module = block.get_submodule(name) if name else block
        prefix = f"{name}." if name else ""
        left = sorted(f"{prefix}{p}" for p, _ in module.named_parameters(recurse=False) if f"{prefix}{p}" not in listed)
        if left:
            raise ArtifactError(f"block {spec.index} FFN site {site.name!r} in {file} to slice every parameter of "
                                f"{name or 'the block'}", f"{', '.join(left)} left out", f"{REMEDY.capitalize()}.")


def _int_in(value: Any, low: int, high: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and low <= value <= high


def check_permutation(order: Any, site: Any, key: str, file: Path) -> torch.Tensor:
    """``order`` as an int64 tensor when it is a permutation of ``range(site.hidden)``."""
    if not isinstance(order, torch.Tensor) or order.ndim != 1 or order.dtype not in (torch.int64, torch.int32):
        found = f"{order.dtype} of shape {tuple(order.shape)}" if isinstance(order, torch.Tensor) else type(order).__name__
        raise ArtifactError(f"permutation {key} in {file} as a 1-D integer tensor", found, f"{REMEDY.capitalize()}.")
    order = order.to(torch.int64)
    if order.numel() != site.hidden or not torch.equal(order.sort().values, torch.arange(site.hidden)):
        raise ArtifactError(f"permutation {key} in {file} to hold each of 0..{site.hidden - 1} once",
                            f"{order.numel()} entries" + ("" if order.numel() != site.hidden else ", some repeated or out of range"),
                            f"The artifact is corrupt; {REMEDY}.")
    return order


def check_finite(tensors: dict[str, torch.Tensor], file: Path) -> None:
    for name, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ArtifactError(f"finite values in {name} of {file}", "NaN or infinity",
                                f"The weights are corrupt; {REMEDY} (or train again).")


def spec_error(file: Path, exc: Exception) -> ArtifactError:
    """The error for a block entry of ``elastic.json`` that does not build a BlockSpec."""
    text = f"{type(exc).__name__}: {exc}"
    return ArtifactError(f"block entries in {file} as elastic_compile.save writes them",
                         text if len(text) < 200 else text[:200] + "...", f"The artifact is corrupt; {REMEDY}.")


_SLICE = {"param": str, "dim": int, "unit_starts": list, "keep": list}
_SITE = {"name": str, "hidden": int, "in_projections": list, "out_projection": dict, "activation": str, "kind": str}
_BLOCK = {"index": int, "path": str, "class_name": str, "residual_of": dict, "output_spec": str,
          "num_output_leaves": int, "features": list, "sites": list, "skippable": bool, "notes": list, "group": int}


def check_block_entry(entry: Any, position: int, file: Path) -> None:
    """The JSON types of one ``blocks`` entry, all the way down, before a BlockSpec is built from it."""
    c = Checker(file)
    where = f"blocks[{position}]"
    if not isinstance(entry, dict):
        c.fail(where, "an object", entry)
    for name, kind in _BLOCK.items():
        c.get(entry, name, kind, where)
    if "rows_split" in entry:  # written since blocks may take inputs that are not batch-major (older files lack it)
        c.get(entry, "rows_split", bool, where)
    if "batch_axis" in entry:  # written since blocks may take streams without a batch axis (older files lack it)
        c.get(entry, "batch_axis", bool, where)
    for leaf, argument in entry["residual_of"].items():
        if not leaf.isdigit() or not isinstance(argument, str):
            c.fail(f"{where}.residual_of", "output leaf numbers -> argument names", entry["residual_of"])
    for k, feature in enumerate(entry["features"]):
        for name, kind in (("name", str), ("kind", str), ("dim", int)):
            c.get(feature, name, kind, f"{where}.features[{k}]")
    for k, site in enumerate(entry["sites"]):
        at = f"{where}.sites[{k}]"
        for name, kind in _SITE.items():
            c.get(site, name, kind, at)
        for j, piece in enumerate(site["in_projections"] + [site["out_projection"]]):
            for name, kind in _SLICE.items():
                c.get(piece, name, kind, f"{at}.slices[{j}]")
            c.ints(piece["unit_starts"], f"{at}.slices[{j}].unit_starts")
            for pair in piece["keep"]:
                if not isinstance(pair, list) or len(pair) != 2:
                    c.fail(f"{at}.slices[{j}].keep", "[start, end] pairs", piece["keep"])
                c.ints(pair, f"{at}.slices[{j}].keep")


def check_spec(spec: Any, position: int, file: Path) -> None:
    """Values of one block entry that nothing else checks before a router or a gate is built from them."""
    c = Checker(file)
    where = f"blocks[{position}]"
    if spec.index != position:
        c.fail(f"{where}.index", f"{position} (blocks in run order)", spec.index)
    for leaf in spec.residual_of:
        if not 0 <= leaf < spec.num_output_leaves:
            c.fail(f"{where}.residual_of", f"output leaves < {spec.num_output_leaves}", spec.residual_of)
    for k, feature in enumerate(spec.features):
        if (feature.kind not in ("pooled", "vector", "scalar") or not 0 < feature.dim <= 1 << 20
                or (feature.kind == "scalar" and feature.dim % 2)):
            c.fail(f"{where}.features[{k}]", "a router feature (kind pooled/vector/scalar, a positive width, even "
                   "for a scalar)", vars(feature))
    names = [site.name for site in spec.sites]
    if len(set(names)) != len(names):
        c.fail(f"{where}.sites", "distinct FFN site names", names)
    c.treespec(spec.output_spec, f"{where}.output_spec")
    if loaded_treespec(spec.output_spec).num_leaves != spec.num_output_leaves:
        c.fail(f"{where}.num_output_leaves", "the leaf count of output_spec", spec.num_output_leaves)
    if spec.skippable and not spec.residual_of:
        c.fail(f"{where}.skippable", "false for a block without residual outputs", spec.skippable)


def check_spec_fits(block: nn.Module, spec: Any, file: Path) -> None:
    """The arguments a block entry names (residual inputs, router features) are parameters of the block's
    forward: a gate or router reading another name would find nothing there."""
    import inspect

    parameters = inspect.signature(block.forward).parameters
    named = list(spec.residual_of.values()) + [f.name for f in spec.features]
    missing = sorted({name for name in named if name not in parameters})
    if missing:
        raise ModelMismatchError(f"{spec.path}.forward to take the arguments {file} names ({', '.join(missing)})",
                                 f"parameters {list(parameters)}", "Load the artifact into the model it was made for.")

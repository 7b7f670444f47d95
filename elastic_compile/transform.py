"""``transform(model, config, example_inputs)``: the single entry point that makes a DiT elastic.

Pipeline: capture (record one forward, export each kind of block) -> analysis (blocks, residual structure, FFN
sites, router inputs) -> passes (order_neurons, elastic_mlp, insert_routers, gate_blocks) -> verify.

Rule: a model whose forward runs is never refused for one block's sake. Each stage that cannot handle a block
degrades that block only (skip-only, width-only, or left dense) and says why in ``ec.report``; the typed errors
left are about the call itself (inputs the forward rejects, a model without any transformer block), and an
unexpected exception from torch surfaces as a typed :class:`TransformError`, never raw.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from .analysis.blocks import Analysis, discover_blocks
from .analysis.spec import BlockSpec
from .analysis.verify import masked_reference, max_abs_difference
from .capture.record import call_model
from .capture.treespec import flatten_output
from .config import ElasticConfig
from .errors import AlreadyElasticError, ConfigError, ElasticCompileError
from .offloading import refuse_offloaded
from .passes import drop_widths, install, leave_dense, order_neurons
from .pretrained import install_save_pretrained
from .report import model_fingerprint
from .serialization import save
from .state import STATE_ATTRIBUTE, ElasticState, force, state_of

logger = logging.getLogger("elastic_compile")


class VerificationError(ElasticCompileError):
    """The rewritten model does not reproduce the dense model (a bug: please report it)."""


class TransformError(ElasticCompileError):
    """A stage of the transform failed in a way no block-level fallback covers (a bug: please report it)."""


def transform(model: nn.Module, config: ElasticConfig | None = None, example_inputs: Any = None, *,
              calibration_inputs: Iterable[Any] | None = None) -> nn.Module:
    """Rewrite ``model`` in place into an elastic model and return it.

    Args:
        model: an unmodified DiT backbone (diffusers transformer, timm-style DiT, hand-written...).
        config: an :class:`ElasticConfig` (defaults: buckets 1/4, 1/2, 3/4, 1).
        example_inputs: the arguments of one real forward call (dict of keyword arguments, or a tuple).
        calibration_inputs: optional iterable of further forward inputs; when given (or with
            ``config.importance == "activation"``), FFN units are ordered by measured activations.

    The returned model has the same class, forward signature and outputs; until routers are trained it
    reproduces the dense model. Use :func:`elastic_compile.force`, :func:`stats`, :func:`report`, :func:`save`.
    """
    config = config or ElasticConfig()
    if not isinstance(config, ElasticConfig):
        raise ConfigError("config as an elastic_compile.ElasticConfig", type(config).__name__,
                          "Pass ElasticConfig(...) (ElasticConfig.from_dict for a dict).")
    if not isinstance(model, nn.Module):
        raise ConfigError("a torch.nn.Module", type(model).__name__, "Pass the model itself (e.g. pipe.transformer).")
    if hasattr(model, STATE_ATTRIBUTE):
        raise AlreadyElasticError("an unmodified model", "a model that transform() already rewrote",
                                  "Transform a fresh copy of the base model, or use it as it is.")
    refuse_offloaded(model, "elastic_compile.transform")
    if example_inputs is None:
        raise ElasticCompileError("example_inputs: the arguments of one real forward call", "None",
                                  "Pass e.g. example_inputs=dict(hidden_states=..., timestep=..., ...).")
    was_training = model.training
    model.eval()
    try:
        _rewrite(model, config, example_inputs, calibration_inputs)
    except ElasticCompileError:
        raise
    except Exception as exc:
        raise TransformError("a transform that degrades what it cannot handle block by block",
                             f"{type(exc).__name__}: {exc}",
                             "Please report the model; transform a fresh copy with verify=False to inspect it.") from exc
    finally:
        model.train(was_training)
    _log_summary(state_of(model))
    return model


def _rewrite(model: nn.Module, config: ElasticConfig, example_inputs, calibration_inputs) -> None:
    fingerprint = model_fingerprint(model)
    analysis = discover_blocks(model, example_inputs)
    try:
        activations = _calibration_activations(model, analysis, config, example_inputs, calibration_inputs)
    except Exception as exc:  # e.g. calibration inputs of another shape: fall back to weight importance
        logger.info("elastic_compile: activation importance unavailable (%s: %s); weights used", type(exc).__name__, exc)
        activations = {}
    state = ElasticState(config=config, specs=analysis.blocks)
    state.fingerprint = fingerprint
    state.left_dense = {n: r for n, r in analysis.degraded.items() if n not in {s.path for s in analysis.blocks}}
    permutations = {}
    for spec, call in zip(analysis.blocks, analysis.calls):
        kept = []
        for site_index, site in enumerate(spec.sites):
            order = _ordered(call.module, site, activations.get((spec.index, site_index)), spec)
            if order is not None:
                permutations[(spec.index, site.name)] = order
                kept.append(site)
        spec.sites = kept
    install(model, state, [call.module for call in analysis.calls], permutations)
    install_save_pretrained(model, save)
    if config.verify:
        _verify(model, state, analysis)


def _ordered(block: nn.Module, site, activation, spec: BlockSpec):
    """``order_neurons`` for one site; on failure the site's weights are restored, the site dropped and noted."""
    saved = {p.param: block.get_parameter(p.param).detach().clone() for p in site.all_slices()}
    try:
        return order_neurons(block, site, activation)
    except Exception as exc:
        with torch.no_grad():
            for name, value in saved.items():
                block.get_parameter(name).copy_(value)
        spec.notes.append(f"FFN {site.name} not elastic: ordering its units failed ({type(exc).__name__}: {exc})")
        return None


def _calibration_activations(model, analysis: Analysis, config: ElasticConfig, example_inputs, calibration_inputs):
    """Mean |h_j| at each site's out-projection input over the calibration forwards ({} for weight importance)."""
    use = config.importance == "activation" or (config.importance == "auto" and calibration_inputs is not None)
    if not use:
        return {}
    inputs = list(calibration_inputs) if calibration_inputs is not None else [example_inputs]
    sums, counts, handles = {}, {}, []
    for spec, call in zip(analysis.blocks, analysis.calls):
        for site_index, site in enumerate(spec.sites):
            key = (spec.index, site_index)
            module = call.module.get_submodule(site.out_projection.module)
            offset, hidden = site.out_projection.unit_starts[0], site.hidden
            channel_dim = -1 if isinstance(module, nn.Linear) else 1

            def hook(mod, args, key=key, offset=offset, hidden=hidden, channel_dim=channel_dim):
                x = args[0].detach().float().movedim(channel_dim, -1)[..., offset:offset + hidden]
                sums[key] = sums.get(key, 0) + x.abs().reshape(-1, hidden).sum(0)
                counts[key] = counts.get(key, 0) + x.numel() // hidden
            handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for item in inputs:
                call_model(model, item)
    finally:
        for handle in handles:
            handle.remove()
    return {key: sums[key] / counts[key] for key in sums}


def _verify(model: nn.Module, state: ElasticState, analysis: Analysis) -> None:
    """Dense reproduction of every block (through its gate), and every width bucket of one block per group
    against its masked dense graph. Blocks of a group share their analysis and code, so one check covers them;
    a failing group keeps dense FFNs (skip-only routers) with the reason in the report."""
    atol = state.config.verify_atol
    checked_groups: dict[int, str | None] = {}
    for spec, call in zip(state.specs, analysis.calls):
        block = call.module
        expected, _ = flatten_output(call.output)
        try:
            with torch.no_grad(), force(model, skip=False, width=1.0):
                got, _ = flatten_output(block(*call.args, **call.kwargs))
            error = max_abs_difference(expected, got)
        except Exception as exc:
            leave_dense(block, spec, state, f"its gate failed on the example ({type(exc).__name__}: {exc})")
            continue
        if error > atol * max(1.0, _scale(expected)):  # nothing should cause this; never ship it elastic
            leave_dense(block, spec, state, f"the rewritten block differs from the dense one (max |diff| {error:.3g})")
            continue
        if not spec.sites:
            continue
        if spec.group not in checked_groups:
            try:
                checked_groups[spec.group] = _width_problem(model, state, analysis.graphs[spec.group], spec, call)
            except Exception as exc:  # the graph cannot be evaluated as a reference: no width is proven
                checked_groups[spec.group] = f"widths could not be verified ({type(exc).__name__}: {exc})"
        if checked_groups[spec.group]:
            drop_widths(block, spec, state, checked_groups[spec.group])


def _width_problem(model: nn.Module, state: ElasticState, exported, spec: BlockSpec, call) -> str | None:
    """Why sliced widths of this block differ from its masked dense graph, or None when they all match."""
    flat = exported.flat_inputs(call.args, call.kwargs)
    for width in state.config.width_buckets[:-1]:
        reference = masked_reference(exported, call.module, flat, spec.sites, width)
        with torch.no_grad(), force(model, skip=False, width=width):
            try:
                got, _ = flatten_output(call.module(*call.args, **call.kwargs))
            except Exception as exc:  # eager code with a hard-coded width
                return f"width {width} fails in eager code ({type(exc).__name__}: {exc})"
        error = max_abs_difference(reference, got)
        if error > state.config.verify_atol * max(1.0, _scale(reference)):
            return f"width {width} differs from the masked dense graph ({error:.3g})"
    return None


def _scale(values: list) -> float:
    return max((float(v.abs().max()) for v in values if isinstance(v, torch.Tensor) and v.numel()), default=1.0)


def _log_summary(state: ElasticState) -> None:
    elastic = sum(1 for s in state.specs if s.sites)
    skippable = sum(1 for s in state.specs if s.skippable)
    logger.info("elastic_compile: %d blocks, %d with elastic FFNs, %d skippable", len(state.specs), elastic, skippable)
    for spec in state.specs:
        for note in spec.notes:
            logger.info("  block %d (%s): %s", spec.index, spec.path, note)

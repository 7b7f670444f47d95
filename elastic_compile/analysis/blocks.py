"""Find the transformer blocks of an unmodified model and analyse each kind of block once.

A *transformer block* is a module that (1) is one of a sequence of layers (a child of a ModuleList /
Sequential, one of several sibling modules of the same class, or a lone module of a class that occurs in such a
sequence: U-ViT's mid block), (2) was called during the example forward, (3) mixes tokens (attention or an
activation-activation matmul) and (4) has at least one output that is a residual update of an input, or at
least an output shaped like an input and an elastic FFN (long-skip fusion blocks such as U-ViT's out-blocks:
they get width-only routers). Among nested matches the innermost modules win.

No stage aborts the discovery on a block it cannot handle: a block whose capture fails is left dense, one whose
residual or FFN analysis fails loses only that capability; the reasons are kept (``Analysis.degraded`` and the
spec's notes) for ``ec.report``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..capture.export import ExportedBlock, export_block
from ..capture.record import ModuleCall, record_calls
from ..capture.treespec import flatten_output
from ..errors import CaptureError, NoTransformerBlocksError
from .batching import batch_axis_problem, splits_by_rows
from .conditioning import router_features
from .ffn import find_ffn_sites
from .residual import find_residual_pairs, has_token_mixing
from .spec import BlockSpec

SEARCHED_FOR = ("repeated residual blocks: children of nn.ModuleList/nn.Sequential or same-class sibling "
                "modules, called in the forward, containing token mixing (attention or an activation x "
                "activation matmul) and returning an output shaped like one of their inputs")


@dataclass
class Analysis:
    """Result of block discovery: specs in run order, plus what verification needs (not saved)."""

    blocks: list[BlockSpec]
    calls: list[ModuleCall]
    graphs: dict[int, ExportedBlock]
    model_output: Any
    rejected: dict[str, str] = field(default_factory=dict)
    #: modules that look like blocks but lost capabilities or were left dense, and why
    degraded: dict[str, str] = field(default_factory=dict)


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Non-leaf submodules that sit in a layer sequence, and lone modules of a class that does."""
    found: dict[str, nn.Module] = {}
    lone: dict[str, nn.Module] = {}
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        classes = [type(c) for _, c in children]
        sequence = isinstance(parent, (nn.ModuleList, nn.Sequential))
        for child_name, child in children:
            if not any(True for _ in child.children()):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if sequence or classes.count(type(child)) >= 2:
                found[name] = child
            else:
                lone[name] = child
    sequenced = {type(m) for m in found.values()}
    found.update({n: m for n, m in lone.items() if type(m) in sequenced})
    return found


def _tensor_leaves(value) -> list[torch.Tensor]:
    return [x for x in pytree.tree_leaves(value) if isinstance(x, torch.Tensor)]


def _shaped_like_an_input(call: ModuleCall) -> bool:
    shapes = {tuple(t.shape) for t in _tensor_leaves((call.args, call.kwargs)) if t.is_floating_point()}
    return any(tuple(t.shape) in shapes for t in _tensor_leaves(call.output))


def _signature(call: ModuleCall) -> tuple:
    params = tuple((n, tuple(p.shape), p.dtype) for n, p in call.module.named_parameters())
    leaves, spec = pytree.tree_flatten(call.bound_arguments())
    inputs = tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
    return type(call.module), params, str(spec), inputs


def _batch_size(call: ModuleCall, names: list[str]) -> int:
    args = call.bound_arguments()
    for name in names:
        if isinstance(args.get(name), torch.Tensor) and args[name].ndim > 0:
            return int(args[name].shape[0])
    return int(_tensor_leaves((call.args, call.kwargs))[0].shape[0])


def discover_blocks(model: nn.Module, example_inputs: Any) -> Analysis:
    """Record one forward, find the transformer blocks, analyse each group of identical blocks once."""
    candidates = candidate_modules(model)
    calls, model_output = record_calls(model, example_inputs, candidates)
    rejected: dict[str, str] = {n: "not called in the forward" for n in candidates if n not in calls}
    degraded: dict[str, str] = {}
    viable = []
    for name, call in calls.items():
        if _shaped_like_an_input(call):
            viable.append(name)
        else:
            rejected[name] = "no output shaped like an input"
    # Innermost first, so containers of already-found blocks need no export.
    viable.sort(key=lambda n: -n.count("."))
    groups: dict[tuple, int] = {}
    group_info: dict[int, tuple[ExportedBlock, dict[int, str]] | None] = {}
    representative: dict[int, str] = {}
    accepted: dict[str, int] = {}
    without_residual: list[str] = []
    for name in viable:
        if any(a.startswith(name + ".") for a in accepted):
            rejected[name] = "contains transformer blocks (the inner ones are used)"
            continue
        call = calls[name]
        key = _signature(call)
        if key not in groups:
            groups[key] = len(groups)
            representative[groups[key]] = name
            group_info[groups[key]] = _analyse_representative(call, rejected, degraded)
        gid = groups[key]
        if group_info[gid] is None:
            rejected.setdefault(name, "not a transformer block (same kind as a rejected module)")
            if representative[gid] in degraded:
                degraded.setdefault(name, degraded[representative[gid]])
        elif not group_info[gid][1]:
            without_residual.append(name)
        else:
            accepted[name] = gid
    # A block without a residual output (e.g. one that first fuses a long skip connection) still gets a
    # width-only router when it sits beside residual blocks of its class, or when an elastic FFN is found in it.
    done_groups: dict[int, tuple] = {}
    siblings = {(n.rsplit(".", 1)[0], type(calls[n].module)) for n in accepted}
    for name in sorted(without_residual, key=lambda n: n.count(".")):
        nested = any(a.startswith(name + ".") or name.startswith(a + ".") for a in accepted)
        gid = groups[_signature(calls[name])]
        if nested:
            rejected[name] = "no output is a residual update of an input"
            continue
        if (name.rsplit(".", 1)[0], type(calls[name].module)) not in siblings:
            if gid not in done_groups:
                done_groups[gid] = _analyse_group(group_info[gid][0], calls[name], group_info[gid][1])
            if not done_groups[gid][0]:
                rejected[name] = "no output is a residual update of an input, and no elastic FFN"
                continue
        accepted[name] = gid
    if not accepted:
        details = "; ".join(f"{n}: {r}" for n, r in sorted(rejected.items())[:12]) or "no candidate modules"
        raise NoTransformerBlocksError(
            SEARCHED_FOR, f"none among {len(candidates)} candidate modules of {type(model).__name__} ({details})",
            "elastic_compile rewrites transformer blocks; pass the DiT backbone itself (e.g. pipe.transformer).",
        )
    blocks, block_calls, graphs = [], [], {}
    row_checks: dict[int, tuple[bool, str]] = {}
    for index, name in enumerate(sorted(accepted, key=lambda n: calls[n].order)):
        call, gid = calls[name], accepted[name]
        exported, pairs = group_info[gid]
        graphs[gid] = exported
        if gid not in done_groups:
            done_groups[gid] = _analyse_group(exported, call, pairs)
        sites, notes, streams = done_groups[gid]
        arguments = call.bound_arguments()
        batch = _batch_size(call, streams)
        # streams without a batch axis: the router reads the call as one sample (streams pooled over all their
        # tokens, conditioning with a single row) and decides once for the whole batch
        no_batch_axis = batch_axis_problem(arguments, streams)
        features = router_features(arguments, streams, 1 if no_batch_axis else batch)
        leaves, spec = flatten_output(call.output)
        skippable = bool(pairs) and all(i in pairs for i, leaf in enumerate(leaves) if leaf is not None)
        block_notes = list(notes)
        if representative[gid] in degraded:
            block_notes.append(degraded[representative[gid]])
        if exported.method == "export_opaque_parts":
            # short: the coverage table cuts notes at 160 characters
            block_notes.append(f"captured with {', '.join(exported.opaque_parts)} as opaque calls (no exporter "
                               "traces them); they stay dense, the graph fixes the example's sizes")
        elif exported.method != "export":
            block_notes.append("captured by draft_export (the forward reads tensor values; the graph is "
                               "specialised to the example's sizes)")
        if not skippable:
            block_notes.append("cannot be skipped: not every output is a residual update of an input")
        if no_batch_axis:  # nothing to cut by rows: one decision covers the call
            rows_split = False
            block_notes.append(f"no batch axis ({no_batch_axis}): one routing decision per call for the whole batch, "
                               "each stream pooled over all its tokens")
        else:
            if gid not in row_checks:
                row_checks[gid] = splits_by_rows(call.module, call.args, call.kwargs, call.output, batch)
            rows_split, why = row_checks[gid]
        if not rows_split and not no_batch_axis:
            block_notes.append(f"inputs not split by rows ({why}): samples with different plans run the whole "
                               "batch together, at the widest width a running sample chose")
        blocks.append(BlockSpec(index=index, path=name, class_name=type(call.module).__name__, residual_of=dict(pairs),
                                output_spec=pytree.treespec_dumps(spec), num_output_leaves=len(leaves),
                                features=features, sites=list(sites), skippable=skippable, notes=block_notes,
                                group=gid, rows_split=rows_split, batch_axis=not no_batch_axis))
        block_calls.append(call)
    return Analysis(blocks, block_calls, graphs, model_output, rejected, degraded)


def _analyse_representative(call: ModuleCall, rejected: dict[str, str], degraded: dict[str, str]):
    """(graph, residual pairs) of a block kind, or None when it is not a block (or cannot be captured)."""
    try:
        exported = export_block(call.module, call.args, call.kwargs, call.bound_arguments())
    except CaptureError as exc:
        rejected[call.name] = f"torch.export failed ({exc.found})"
        if _looks_like_a_block(call):
            degraded[call.name] = f"left dense: capture failed ({exc.found})"
        return None
    try:
        mixing = has_token_mixing(exported)
    except Exception as exc:  # an analysis bug must not abort the transform
        rejected[call.name] = f"token mixing analysis failed ({type(exc).__name__}: {exc})"
        return None
    if not mixing:
        rejected[call.name] = "no token mixing (attention) in its graph"
        return None
    try:
        pairs = find_residual_pairs(exported, exported.flat_inputs(call.args, call.kwargs), call.module)
    except Exception as exc:
        pairs = {}
        degraded[call.name] = f"not skippable: residual analysis failed ({type(exc).__name__}: {exc})"
    return exported, pairs


def _looks_like_a_block(call: ModuleCall) -> bool:
    """A block we could not capture, as far as its modules tell: it holds attention-like and linear layers."""
    return any(isinstance(m, (nn.MultiheadAttention, nn.Linear)) for m in call.module.modules())


def _analyse_group(exported: ExportedBlock, call: ModuleCall, pairs: dict[int, str]):
    """FFN sites, notes and the hidden-state stream inputs of one block group."""
    streams = list(dict.fromkeys(pairs.values()))
    out_indices = set(pairs)
    if not streams:  # e.g. long-skip fusion blocks: their stream is the input shaped like the output
        out_shapes = [tuple(t.shape) for t in _tensor_leaves(call.output)]
        streams = [n for n, v in call.bound_arguments().items()
                   if isinstance(v, torch.Tensor) and v.is_floating_point() and tuple(v.shape) in out_shapes]
        out_indices = set(range(len(out_shapes)))
    try:
        sites, rejected_sites = find_ffn_sites(exported, set(streams), out_indices)
    except Exception as exc:  # an analysis that cannot follow this graph: the block keeps dense FFNs
        sites, rejected_sites = [], [f"FFN analysis failed ({type(exc).__name__}: {exc})"]
    notes = [f"FFN not elastic: {r}" for r in rejected_sites]
    if not sites:
        notes.append("no elastic FFN found: the router can only skip this block")
    return sites, notes, streams

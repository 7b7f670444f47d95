"""Compiled routing, the gate's mode under ``device_routing(model, "compile")``: a forward ``torch.compile`` can
trace whole (``fullgraph=True``), with every decision a tensor and every width bucket behind ``torch.cond``.

The host gate (:mod:`.host`) copies each router's logits to the host (``Tensor.tolist``) and branches in Python:
under ``torch.compile`` that is a graph break per block. Here, as in :mod:`.device`, the router's logits become
``(run, bucket)`` tensors (:func:`~.decisions.device_decisions`); the block then runs once, on the whole batch,
at the dense width, each sample's FFN units past its own bucket zeroed (units are ordered and buckets keep
prefixes, so that *is* the narrower FFN), and rows of samples that skip keep the residual input. Whether it runs
at all is a ``torch.cond`` on the device: a block that no sample runs costs nothing. So a compiled forward saves
the work of its skips but not of its narrower widths (eager routing saves both; why not one branch per bucket:
the comment in :func:`forward`). Same guarantee as :mod:`.device`: per sample, the output is the
residual input when the block does not run for it, else the block's output at its chosen bucket (to float
rounding).

What the compiled forward does not do (each traced once into the graph, so it must not depend on the caller):

* ``force`` does not apply: it is a per-context value (``contextvars``), which a graph cannot read; a compiled
  forward is always routed by its routers (``force`` still applies to eager forwards of the same model);
* the feature cache is not supported (its per-caller rows and in-place bookkeeping): a typed error;
* blocks with an output that is not a residual stream (a joint block's ``None`` context) are not supported:
  a typed error (route such a model eagerly);
* routers run their trained form (``Router.plain_logits``), not the host path's folded weights (the compiler
  fuses it instead).

``device_routing(model, "compile_select")`` is the same without ``torch.cond``: every block runs on the whole
batch (dense work) and rows are selected. It is for blocks Dynamo cannot trace inside a ``torch.cond`` branch:
on torch 2.13 that includes blocks using diffusers' ``Attention`` class (its ``inspect.signature`` call fails
inside a branch: DiT, PixArt); Flux and Wan blocks trace with ``torch.cond``.

Decisions are still recorded (as device tensors, copied to the host only when ``elastic_compile.stats`` asks).
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ...batch import per_sample
from ...capture.treespec import flatten_output
from ...errors import ConfigError
from ...state import BlockCall, gate_of, state_of
from .decisions import device_decisions
from .device import own_width_masks


def check_supported(gate) -> None:
    """Typed errors for what a compiled forward cannot trace (module docstring)."""
    state = gate.state
    if state.cache is not None and gate.spec.skippable:
        raise ConfigError("no feature cache with compiled routing", "the feature cache is on",
                          "Turn the cache off for compiled forwards (ec.cache(model, ...) off), or route eagerly.")
    missing = [i for i in range(gate.spec.num_output_leaves) if i not in gate.spec.residual_of]
    if missing:
        raise ConfigError("every output of a block to be a residual stream (compiled routing)",
                          f"block {gate.spec.path} has outputs {missing} without a residual input",
                          "Route this model eagerly (host routing, the default, or device_routing(model, 'host')).")


def prepare(model) -> None:
    """What a traced forward must find ready, made eagerly: each gate's output ``TreeSpec`` (loaded from its
    JSON form, which Dynamo cannot trace) and its prefix masks on the model's device (cached on the gate: a
    branch of ``torch.cond`` may not write an attribute)."""
    state = state_of(model)
    device = next(iter(model.parameters())).device
    for block in state.blocks:
        gate = gate_of(block)
        gate.compiled_output_spec = gate.output_spec
        if gate.spec.sites:
            gate.prefix_masks(device)


def forward(gate, args: tuple, kwargs: dict):
    state, spec = gate.state, gate.spec
    check_supported(gate)
    arguments = gate.bind(args, kwargs)
    can_skip = spec.skippable and state.config.allow_skip
    dense = state.dense_bucket
    router = gate.router
    if router is None or not (can_skip or spec.elastic_width):
        return gate.run_plan((True, dense), args, kwargs, arguments)
    logits = router.plain_logits(arguments).float()
    run, bucket = device_decisions(logits, can_skip, spec.elastic_width, state.config.threshold, dense,
                                   router.num_widths)
    state.record(BlockCall(gate.index, run, bucket, True, []))
    inputs = gate.residual_inputs(arguments)
    leaf_ids = sorted(inputs)
    # One torch.cond per block: the block runs (at the dense width) when any sample runs it, else it costs
    # nothing. Narrower samples get their own width through unit masks (buckets keep prefixes of ordered units,
    # so a masked dense FFN *is* the narrower one). Not one branch per bucket: Dynamo (torch 2.13) keeps the
    # first value it read of Python state set around a torch.cond (the width switch) for every later torch.cond
    # of the same forward, so per-bucket branches would all run the first bucket's width.
    control = gate.control
    control.bucket = None
    control.unit_masks = own_width_masks(gate, bucket, dense, logits.device) if spec.elastic_width else None

    def run_block(*current):
        leaves, _ = flatten_output(gate.original_forward(*args, **kwargs))
        return tuple(torch.where(per_sample(run, out), leaves[i], out).contiguous()
                     for i, out in zip(leaf_ids, current))

    def skip_block(*current):  # torch.cond wants both branches' outputs laid out alike: contiguous
        return tuple(out.clone(memory_format=torch.contiguous_format) for out in current)

    operands = tuple(inputs[i] for i in leaf_ids)
    try:  # the branches may not write anything outside themselves: the switch is set around the torch.cond
        if state.device_routing.branches.mode == "compile_select":
            outputs = run_block(*operands)
        else:
            outputs = tuple(torch.cond(run.any(), run_block, skip_block, operands))
    finally:
        control.unit_masks = None
    by_leaf = dict(zip(leaf_ids, outputs))
    return pytree.tree_unflatten([by_leaf[i] for i in range(spec.num_output_leaves)], gate.compiled_output_spec)

"""Device routing, the gate's mode under :func:`device_routing`: decisions stay on the device, blocks branch on
them without a device-to-host copy.

The host gate (:mod:`.host`) copies each router's logits to the host to choose what runs next; on a GPU that copy
is a synchronisation that drains the queue once per block. Here each gate computes its decisions as tensors
(:mod:`.decisions`) and puts each width bucket behind a device-evaluated condition (:class:`Branches`; at most
one is true per block); what evaluates it is the mode:

* ``"graph"``: a CUDA-graph IF node (CUDA >= 12.4, ``torch.cuda.CUDAGraph.begin_capture_to_if_node``), so one
  graph of the whole forward replays with every decision taken on the GPU (:mod:`elastic_compile.serve.cuda_graph`
  captures it);
* ``"host"``: ``if bool(condition)`` (the same computation in eager mode; on CPU it costs nothing and is what the
  tests compare against the host gate);
* ``"every"``: every body runs (warm-up before a capture: every kernel of every bucket is initialised once).

Guarantees, per sample: the block output is the residual input (plus the cache's stand-in) when the block does not
run for it and the output of the block at the chosen bucket when it runs, as with the host gate (to float
rounding). A block runs once, on the whole batch, at the widest bucket any running sample chose, with each
sample's FFN units past its own bucket zeroed before the out-projection (units are ordered and buckets keep
prefixes, so that *is* the narrower FFN); rows of skipped samples are computed and discarded. So a batch costs its
widest decision per block (the host gate runs sub-batches instead, which needs the host): with batch 1, or samples
that agree, exactly the chosen bucket runs. ``elastic_compile.stats`` counts that work in
``executed_flops_fraction`` and the decisions' own cost in ``decided_flops_fraction``.

The feature cache works here too, with its one statement of the rules (``elastic_compile/cache/rules.py``) on
device tensors: its per-(context, block, batch) state lives in buffers updated in place
(``FeatureCacheState.device_entries``), so ``reset_cache`` reaches a captured graph's state. Not supported (a
typed error): skippable blocks with tensor outputs that are not residual streams.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from ...batch import device_of, per_sample
from ...capture.treespec import flatten_output
from ...errors import BackendUnavailableError, ConfigError
from ...state import BlockCall, ElasticState, state_of
from . import host
from .decisions import device_actions, device_decisions, fused_decisions

BRANCH_MODES = ("graph", "host", "every", "compile", "compile_select")  # the last two: nn/gate/compiled.py


def conditional_nodes_available() -> bool:
    """Whether this PyTorch can put code behind a CUDA-graph IF node (needs a CUDA build, CUDA >= 12.4)."""
    return (torch.cuda.is_available() and torch.version.cuda is not None
            and all(hasattr(torch.cuda.CUDAGraph, name) for name in
                    ("begin_capture_to_if_node", "end_capture_to_conditional_node", "get_currently_capturing_graph"))
            and tuple(int(p) for p in torch.version.cuda.split(".")[:2]) >= (12, 4))


def require_conditional_nodes() -> None:
    """``BackendUnavailableError`` unless :func:`conditional_nodes_available`."""
    if not conditional_nodes_available():
        raise BackendUnavailableError("a CUDA GPU and PyTorch with conditional CUDA-graph nodes (CUDA >= 12.4)",
                                      f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                      f"GPU {'present' if torch.cuda.is_available() else 'absent'}",
                                      "Run on a GPU machine with a CUDA build of PyTorch 2.11 or later, or use the "
                                      "default host-routed execution.")


class Branches:
    """Runs ``body()`` when a device-side boolean scalar is true, the way ``mode`` says (see module doc)."""

    def __init__(self, mode: str):
        if mode not in BRANCH_MODES:
            raise ConfigError(f"a branch mode among {BRANCH_MODES}", repr(mode), "Use 'graph' inside a CUDA-graph "
                              "capture, 'host' for eager execution.")
        self.mode = mode

    def run_if(self, condition: torch.Tensor, body) -> None:
        if self.mode == "every":
            body()
        elif self.mode == "host":
            if bool(condition):
                body()
        else:
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(condition)
            try:
                body()
            finally:
                graph.end_capture_to_conditional_node()


@dataclass
class DeviceRouting:
    """Installed on an :class:`~elastic_compile.state.ElasticState` while gates route on the device.

    ``log``: per block call, ``(block, run, bucket, router_ran, stand_in)`` where ``run``/``bucket``/``stand_in``
    are device tensors (refreshed by every replay of a captured graph) or host lists (decisions pinned by
    ``force``); a nonzero stand-in code means the feature cache stood in for the block.
    """

    branches: Branches
    log: list = field(default_factory=list)
    decide: Callable = device_decisions  # or its compiled form (fused_decisions)

    def calls(self) -> list[BlockCall]:
        """The logged decisions as host records (one device-to-host copy for the whole forward)."""
        tensors = [t for entry in self.log for t in entry[1:] if isinstance(t, torch.Tensor)]
        host = iter(torch.cat([t.reshape(-1).long() for t in tensors]).tolist()) if tensors else iter(())

        def listed(value, kind):
            return [kind(next(host)) for _ in range(value.numel())] if isinstance(value, torch.Tensor) else value
        calls = []
        for block, run, bucket, router_ran, stand_in in self.log:
            run, bucket, reused = listed(run, bool), listed(bucket, int), listed(stand_in, bool)
            calls.append(BlockCall(block, run, bucket, router_ran, reused, batched=True))
        return calls


def check_supported(state: ElasticState) -> None:
    if state.soft:
        raise ConfigError("hard decisions for device routing", "soft decisions (router training in progress)",
                          "Route on the device only at inference.")


@contextlib.contextmanager
def device_routing(model: nn.Module, mode: str = "host", fuse_decisions: bool = False):
    """Inside the ``with`` block, every gate of ``model`` decides on the device and branches with ``mode``;
    ``fuse_decisions`` compiles the decision function (:func:`fused_decisions`).

    Yields the :class:`DeviceRouting` whose ``log`` collects each forward's decisions (reset when a forward
    starts); ``elastic_compile.stats`` copies them to the host when asked, also after the ``with`` block.
    """
    state = state_of(model)
    check_supported(state)
    if mode == "graph":
        require_conditional_nodes()
    if mode in ("compile", "compile_select"):
        from .compiled import prepare  # compiled imports this module
        prepare(model)
    previous = state.device_routing
    routing = DeviceRouting(Branches(mode), decide=fused_decisions() if fuse_decisions else device_decisions)
    state.device_routing = routing
    try:
        yield routing
    finally:
        state.device_routing = previous


def forward(gate, args: tuple, kwargs: dict):
    """The block's output with every decision taken on the device (module docstring); where ``force`` or the spec
    fixes every decision and no cache applies, there is nothing to wait for and the host path runs instead."""
    state, dense = gate.state, gate.state.dense_bucket
    arguments = gate.bind(args, kwargs)
    batch = gate.stream_batch(arguments)
    run, bucket = gate.static_decisions(batch)
    cache = state.cache if gate.spec.skippable else None
    if run is not None and bucket is not None and cache is None:
        return host.forward(gate, args, kwargs)
    missing = [i for i in range(gate.spec.num_output_leaves) if i not in gate.spec.residual_of]
    meta = output_meta(gate, args, kwargs) if missing else []
    missing_tensors = [i for i in missing if isinstance(meta[i], tuple)]
    if missing_tensors and (run is None or not all(run)):
        raise ConfigError("every tensor output of a skippable block to be a residual stream (device routing)",
                          f"block {gate.spec.path} has outputs {missing_tensors} without a residual input",
                          "Route this model on the host (the default), whose skip returns None for them.")
    device = device_of((args, kwargs))
    router_ran = run is None or bucket is None
    run_logit = actions = None
    if router_ran:
        router = gate.router
        logits = router.logits(arguments).float()
        routed_run, routed_bucket = state.device_routing.decide(
            logits, gate.spec.skippable and state.config.allow_skip and run is None,
            gate.spec.elastic_width and bucket is None, state.config.threshold, dense, router.num_widths)
        run_logit = logits[:, 0] if run is None else None
        if router.num_actions and run is None:
            actions = device_actions(logits, router.num_widths)
    pinned = gate.forced_action()
    if pinned is not None:
        actions = torch.full((batch,), pinned, dtype=torch.long, device=device)
    # pinned values are the same for every sample: filled on the device (a host copy would break a capture)
    run_t = routed_run if run is None else torch.full((batch,), run[0], device=device)
    bucket_t = routed_bucket if bucket is None else torch.full((batch,), bucket[0], device=device)
    inputs = gate.residual_inputs(arguments)
    stand_in = entry = None
    if cache is not None:
        entry = cache.device_entry(gate.index, inputs, batch)
        entry.tick()
        run_t, stand_in = cache.plan(entry, run_t, run_logit, state.config.threshold, actions)
    state.record(BlockCall(gate.index, run if run is not None and stand_in is None else run_t,
                           bucket if bucket is not None else bucket_t, router_ran,
                           stand_in if stand_in is not None else []))
    outputs = {i: x.clone() for i, x in inputs.items()} if entry is None else entry.skip_values(inputs, stand_in)
    outputs.update({i: torch.empty(meta[i][0], dtype=meta[i][1], device=device) for i in missing_tensors})
    num_buckets = len(state.config.width_buckets)
    buckets = range(num_buckets) if bucket is None else sorted(set(bucket))
    # Few, tiny device ops between two blocks (each is a kernel in a captured graph): the bucket each sample
    # runs (-1: skipped) and the widest of them; one body runs, at that widest bucket.
    choice = torch.where(run_t, bucket_t, -1)
    widest = choice.max()
    wanted = widest == torch.arange(num_buckets, device=device)
    branches = state.device_routing.branches
    whole = batch == 1 and branches.mode != "every"  # the body runs only when its one sample chose it
    narrower = bucket is None and batch > 1  # samples may want narrower buckets than the one that runs
    for b in buckets:
        def body(b=b):
            if narrower:  # each sample's FFN cut to its own width: its units past it are zeroed
                gate.control.unit_masks = own_width_masks(gate, bucket_t, b, device)
            try:
                leaves, _ = flatten_output(gate.run_plan((True, b), args, kwargs, arguments))
            finally:
                gate.control.unit_masks = None
            rows = None if whole else run_t & (widest == b)
            for i, out in outputs.items():
                if whole:
                    out.copy_(leaves[i])
                else:
                    out.copy_(torch.where(per_sample(rows, out), leaves[i], out))
        branches.run_if(wanted[b], body)
    if entry is not None:
        entry.store(inputs, outputs, run_t, stand_in)
    constants = {i: meta[i].value for i in missing if i not in missing_tensors}
    return pytree.tree_unflatten([outputs[i] if i in outputs else constants[i]
                                  for i in range(gate.spec.num_output_leaves)], gate.output_spec)


def own_width_masks(gate, sample_buckets: torch.Tensor, running: int, device) -> dict[int, torch.Tensor]:
    """Per FFN site, (B, units at bucket ``running``): 1 for the units of each sample's own bucket, else 0."""
    width = gate.state.config.width_buckets[running]
    return {k: prefix.index_select(0, sample_buckets)[:, :gate.spec.sites[k].units_at(width)]
            for k, prefix in enumerate(gate.prefix_masks(device))}


@dataclass(frozen=True)
class Constant:
    """A non-tensor output leaf of a block (e.g. the ``None`` a last joint block returns for its context)."""

    value: object


def output_meta(gate, args, kwargs) -> list:
    """Per output leaf of the gate's block for these inputs: ``(shape, dtype)`` of a tensor, else
    ``Constant(value)``; from a dense forward on fake tensors (no compute), cached on the gate per input signature."""
    key = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                for t in pytree.tree_leaves((args, kwargs)))
    cache = gate.__dict__.setdefault("_output_meta", {})
    if key not in cache:
        with FakeTensorMode(allow_non_fake_inputs=True):
            leaves, _ = flatten_output(gate.original_forward(*args, **kwargs))
        cache[key] = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else Constant(t) for t in leaves]
    return cache[key]

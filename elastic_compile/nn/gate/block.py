"""The block gate: per sample, skip the block or run it at a width bucket, as its router (or ``force``) says.

A :class:`BlockGate` replaces the block's ``forward`` on the instance (the block keeps its class, parameters and
state-dict keys) and restores the block's output structure exactly. What it does per call depends on the mode the
model is in, each mode a strategy of its own module, chosen by :func:`mode_of`:

* :mod:`.host` (inference, the default): decisions on the host, samples sharing a plan run as one sub-batch;
* :mod:`.device` (``device_routing``): decisions as device tensors, buckets behind device conditions;
* :mod:`.soft` (router training): straight-through decisions, differentiable in the router's outputs;
* :mod:`.profile` (``stats``' FLOP tables): one forward per width bucket on shape-only tensors.

The gate itself holds what the strategies share: the block's data, the decisions ``force`` and the spec fix, and
how a host-side plan executes.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ...analysis.spec import BlockSpec
from ...batch import device_of, select_rows
from ...capture.record import SignatureBinder
from ...capture.treespec import flatten_output, loaded_treespec
from ...state import ElasticState
from ..router import Router
from ..width import WidthControl
from . import compiled, device, host, profile, soft
from .decisions import host_actions, host_decisions


def mode_of(state: ElasticState):
    """The strategy the gates of a model in ``state`` run: FLOP profiling, else soft training (unless ``force``
    pins the decisions), else device routing, else host routing."""
    if state.profiling:
        return profile.forward
    if state.soft and state.forced is None:
        return soft.forward
    if state.device_routing is not None:
        return (compiled.forward if state.device_routing.branches.mode in ("compile", "compile_select")
                else device.forward)
    return host.forward


class BlockGate:
    """Callable installed as ``block.forward``."""

    def __init__(self, block: nn.Module, spec: BlockSpec, router: Router | None, control: WidthControl,
                 state: ElasticState, original_forward):
        self.spec = spec
        self.router = router
        self.control = control
        self.state = state
        self.original_forward = original_forward
        self.signature = inspect.signature(original_forward)
        self.bind = SignatureBinder(self.signature)
        self.stream_names = tuple(spec.residual_of.values()) + tuple(f.name for f in spec.features)

    def __call__(self, *args, **kwargs):
        state = self.state
        if state.profiling or state.soft or state.device_routing is not None:
            return mode_of(state)(self, args, kwargs)
        return host.forward(self, args, kwargs)  # inference: between every two blocks, after one test of the mode

    @property
    def output_spec(self) -> pytree.TreeSpec:
        return loaded_treespec(self.spec.output_spec)

    @property
    def index(self) -> int:
        return self.spec.index

    @property
    def torch_forward(self):
        """The block's own PyTorch forward, also where an exported runtime put a graph executor in its place."""
        return getattr(self.original_forward, "torch_forward", self.original_forward)

    # decisions -------------------------------------------------------------------------------------------
    def stream_batch(self, arguments: dict) -> int:
        """Samples the gate decides for: the streams' leading size, or 1 for streams without a batch axis (the
        whole call is one sample, see :mod:`elastic_compile.nn.call_router`)."""
        if not self.spec.batch_axis:
            return 1
        for name in self.stream_names:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
        raise RuntimeError(f"block {self.spec.path} was called without its hidden-state input")

    def routes_everything(self) -> bool:
        """Whether the router decides every sample's run and width (no ``force``; the block may skip and narrow)."""
        state = self.state
        return state.forced is None and self.spec.elastic_width and self.spec.skippable and state.config.allow_skip

    def static_decisions(self, batch: int) -> tuple[list[bool] | None, list[int] | None]:
        """Per-sample run / bucket fixed without the router (by ``force`` or the block's spec); None: the router's."""
        if self.routes_everything():
            return None, None
        state, dense = self.state, self.state.dense_bucket
        can_skip = self.spec.skippable and state.config.allow_skip
        forced = state.forced
        run = bucket = None
        if forced is not None:
            skip = forced.skips(self.index)
            if skip is not None:
                run = [not (skip and can_skip)] * batch
            if forced.width is not None:
                bucket = [state.bucket_index(forced.width) if self.spec.elastic_width else dense] * batch
        if run is None and not can_skip:
            run = [True] * batch
        if bucket is None and not self.spec.elastic_width:
            bucket = [dense] * batch
        return run, bucket

    def forced_action(self) -> int | None:
        """The skip action ``force`` pins for this block (an index into ``skip_actions``), or None."""
        forced = self.state.forced
        return None if forced is None else forced.action_of(self.index)

    def decide(self, arguments: dict, batch: int):
        """Per-sample ``(run, bucket, router_ran, p_run, actions)`` from ``force`` or the router; ``actions`` (the
        skip action each sample's router chose) is None where the router has no action head or did not run."""
        run, bucket = self.static_decisions(batch)
        pinned = self.forced_action()
        if run is not None and bucket is not None:
            return run, bucket, False, None, None if pinned is None else [pinned] * batch
        # One device-to-host copy per block (each is a synchronisation that drains an accelerator's queue), and
        # the decisions are made on the host: a handful of floats, no further tensor ops between two blocks.
        router = self.router
        rows = router.logits(arguments).tolist()
        routed_run, routed_bucket, p_run = host_decisions(rows, self.state.config.threshold, run is None,
                                                          bucket is None, router.num_widths)
        actions = host_actions(rows, router.num_widths) if router.num_actions and run is None else None
        if pinned is not None:
            actions = [pinned] * batch
        run = run if routed_run is None else routed_run
        return run, (bucket if routed_bucket is None else routed_bucket), True, p_run, actions

    # execution of a host-side plan -----------------------------------------------------------------------
    def execute(self, run: list[bool], bucket: list[int], stand_in: list[int] | None, args, kwargs,
                arguments: dict, batch: int):
        """The block's output for these decisions (one call, a skip, or sub-batches), stored in the feature cache.
        ``stand_in``: per sample, what the cache adds to a skipped sample's input (None: no cache here)."""
        if all(run) and len(set(bucket)) == 1:
            out = self.run_plan((True, bucket[0]), args, kwargs, arguments)
        elif not any(run):
            return self.skip_output(arguments, stand_in)
        else:
            out = self.run_mixed(run, bucket, stand_in, args, kwargs, arguments, batch)
        if stand_in is not None:
            leaves, _ = flatten_output(out)
            self.state.cache.entry(self.index, batch).store(self.residual_inputs(arguments),
                                                            {i: leaves[i] for i in self.spec.residual_of}, run)
        return out

    def run_plan(self, plan: tuple[bool, int], args, kwargs, arguments):
        run, bucket = plan
        if not run:
            return self.skip_output(arguments)
        self.control.bucket = None if bucket == self.state.dense_bucket else bucket
        try:
            return self.original_forward(*args, **kwargs)
        finally:
            self.control.bucket = None

    def residual_inputs(self, arguments: dict) -> dict[int, torch.Tensor]:
        return {i: arguments[name] for i, name in self.spec.residual_of.items()}

    def skip_output(self, arguments: dict, stand_in: list[int] | None = None):
        """The block's output when skipped: its residual inputs, plus the cache's stand-ins where ``stand_in`` says."""
        values = self.residual_inputs(arguments)
        if stand_in is not None:
            values = self.state.cache.entry(self.index, len(stand_in)).skip_values(values, stand_in)
        leaves = [values.get(i) for i in range(self.spec.num_output_leaves)]
        return pytree.tree_unflatten(leaves, self.output_spec)

    def run_mixed(self, run: list[bool], bucket: list[int], stand_in: list[int] | None, args, kwargs, arguments,
                  batch: int):
        """Skipped rows from ``skip_output``; each group of samples sharing a bucket runs as one sub-batch."""
        full = [None] * self.spec.num_output_leaves
        if not all(run):
            full, _ = flatten_output(self.skip_output(arguments, stand_in))
        groups: dict[int, list[int]] = {}
        for sample, (r, b) in enumerate(zip(run, bucket)):
            if r:
                groups.setdefault(b, []).append(sample)
        for b, samples in groups.items():
            index = torch.tensor(samples, dtype=torch.long, device=device_of((args, kwargs)))
            sub_args, sub_kwargs = select_rows((args, kwargs), index, batch)
            sub_arguments = self.bind(sub_args, sub_kwargs)
            leaves, _ = flatten_output(self.run_plan((True, b), sub_args, sub_kwargs, sub_arguments))
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    if full[i] is None:
                        full[i] = leaf.new_empty((batch,) + tuple(leaf.shape[1:]))
                    full[i] = full[i].index_copy(0, index, leaf)
        return pytree.tree_unflatten(full, self.output_spec)

    def prefix_masks(self, device) -> list[torch.Tensor]:
        """Per FFN site, a (buckets, hidden) 0/1 matrix: row k keeps the first units(bucket k) units (the unit
        masks of soft training and of device routing's narrower samples)."""
        if getattr(self, "_prefix_masks", None) is None or self._prefix_masks[0].device != torch.device(device):
            buckets = self.state.config.width_buckets
            self._prefix_masks = [
                (torch.arange(site.hidden)[None, :] < torch.tensor([site.units_at(b) for b in buckets])[:, None])
                .float().to(device) for site in self.spec.sites]
        return self._prefix_masks

"""The block gate: per sample, skip the block or run it at a width bucket, as its router (or ``force``) says.

Samples that share a plan run together as one sub-batch; skipped samples take their residual inputs as
outputs. The gate replaces the block's ``forward`` on the instance (the block keeps its class, parameters and
state-dict keys) and restores the block's output structure exactly.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ...analysis.flop_counter import flop_counter
from ...analysis.spec import BlockSpec
from ...batch import per_sample
from ...capture.record import SignatureBinder
from ...capture.treespec import flatten_output, loaded_treespec
from ...errors import ConfigError
from ...state import BlockCall, ElasticState
from ..router import Router
from ..sliced import WidthControl
from .decisions import host_decisions, run_logit_threshold


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

    def decide(self, arguments: dict, batch: int) -> tuple[list[bool], list[int], bool, list[float] | None]:
        """Per-sample (run, bucket) from ``force`` or the router; also whether the router ran and its p_run."""
        state = self.state
        run, bucket = self.static_decisions(batch)
        if run is not None and bucket is not None:
            return run, bucket, False, None
        # One device-to-host copy per block (each is a synchronisation that drains an accelerator's queue), and
        # the decisions are made on the host: a handful of floats, no further tensor ops between two blocks.
        rows = self.router.logits(arguments).tolist()
        routed_run, routed_bucket, p_run = host_decisions(rows, state.config.threshold, run is None, bucket is None)
        run = run if routed_run is None else routed_run
        return run, (bucket if routed_bucket is None else routed_bucket), True, p_run

    def apply_cache_policy(self, run: list[bool], p_run: list[float] | None, batch: int) -> tuple[list[bool], list[bool]]:
        """(run, reuse) after the feature cache's rules (see elastic_compile/cache)."""
        cache = self.state.cache
        if cache is None or not self.spec.skippable or self.state.profiling:
            return run, [False] * batch
        usable = cache.usable(self.index, batch)
        band = cache.config.band
        if band is None:
            reuse = [not r and u for r, u in zip(run, usable)]
        elif p_run is None:
            reuse = [False] * batch
        else:
            limit = self.state.config.threshold + band
            reuse = [r and u and p < limit for r, u, p in zip(run, usable, p_run)]
            run = [r and not re for r, re in zip(run, reuse)]
        if cache.config.fallback == "run":  # no identity skips: reuse when possible, else run
            reuse = [re or (not r and u) for r, re, u in zip(run, reuse, usable)]
            run = [r or not re for r, re in zip(run, reuse)]
        return run, reuse

    # execution -------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        state = self.state
        if state.profiling or state.soft or state.device_routing is not None:
            return self.call_in_mode(args, kwargs)
        # Inference with host routing: the path every block takes between two others, where each Python step runs
        # with cold caches (73-88 us per block in place before it was cut down, DiT-B/2 batch 1): no batch-size
        # scan or decision helpers when the router decides everything.
        arguments = self.bind(args, kwargs)
        if self.routes_everything():
            rows = self.router.logits(arguments).tolist()
            run, bucket, p_run = host_decisions(rows, state.config.threshold, True, True)
            batch, router_ran = len(rows), True
        else:
            batch = self.stream_batch(arguments)
            run, bucket, router_ran, p_run = self.decide(arguments, batch)
        run, reuse = self.apply_cache_policy(run, p_run, batch)
        state.record(BlockCall(self.index, run, bucket, router_ran, reuse))
        return self.execute(run, bucket, reuse, args, kwargs, arguments, batch)

    def call_in_mode(self, args, kwargs):
        """The call during router training (``soft``), device routing, or FLOP profiling."""
        arguments = self.bind(args, kwargs)
        batch = self.stream_batch(arguments)
        if self.state.soft and self.state.forced is None and not self.state.profiling:
            return self.soft_forward(args, kwargs, arguments, batch)
        if self.state.device_routing is not None and not self.state.profiling:
            routed = self.device_forward(args, kwargs, arguments, batch)
            if routed is not None:
                return routed
        run, bucket, router_ran, p_run = self.decide(arguments, batch)
        run, reuse = self.apply_cache_policy(run, p_run, batch)
        self.state.record(BlockCall(self.index, run, bucket, router_ran, reuse))
        if self.state.profiling:
            with flop_counter() as counter:
                out = self.run_plan((run[0], bucket[0]), args, kwargs, arguments)
            self.state.profile_sink.append((self.index, counter.get_total_flops()))
            return out
        return self.execute(run, bucket, reuse, args, kwargs, arguments, batch)

    def execute(self, run: list[bool], bucket: list[int], reuse: list[bool], args, kwargs, arguments: dict,
                batch: int):
        """The block's output for these decisions (one call, a skip, or sub-batches), stored in the feature cache."""
        if all(run) and len(set(bucket)) == 1:
            out = self.run_plan((True, bucket[0]), args, kwargs, arguments)
        elif not any(run):
            return self.skip_output(arguments, reuse)
        else:
            out = self.run_mixed(run, bucket, reuse, args, kwargs, arguments, batch)
        if self.state.cache is not None and self.spec.skippable:
            leaves, _ = flatten_output(out)
            self.state.cache.store(self.index, self.residual_inputs(arguments),
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

    def device_forward(self, args, kwargs, arguments: dict, batch: int):
        """Routing without a device-to-host copy (``nn/gate/device.py``); None when ``force`` or the spec
        fixes every decision (the host path then has nothing to wait for).

        Decisions are computed as tensors; the output starts as the residual inputs (the skip output). The block
        runs once, on the whole batch, at the widest bucket any running sample chose (``branches.run_if`` on
        each bucket: at most one is true), with every sample's FFN units past its own bucket zeroed before the
        out-projection (``WidthControl.unit_masks``: the same function as that sample's narrower bucket, because
        units are ordered and each bucket keeps a prefix); only the rows of running samples are written back.
        """
        run, bucket = self.static_decisions(batch)
        state, dense = self.state, self.state.dense_bucket
        cache = state.cache if self.spec.skippable else None
        if run is not None and bucket is not None and cache is None:
            return None
        missing = [i for i in range(self.spec.num_output_leaves) if i not in self.spec.residual_of]
        meta = self.output_meta(args, kwargs) if missing else []
        missing_tensors = [i for i in missing if isinstance(meta[i], tuple)]
        if missing_tensors and (run is None or not all(run)):
            raise ConfigError("every tensor output of a skippable block to be a residual stream (device routing)",
                              f"block {self.spec.path} has outputs {missing_tensors} without a residual input",
                              "Route this model on the host (the default), whose skip returns None for them.")
        device = _device_of(args, kwargs)
        router_ran = run is None or bucket is None
        run_logit = None
        if router_ran:
            logits = self.router.logits(arguments).float()
            routed_run, routed_bucket = state.device_routing.decide(
                logits, self.spec.skippable and state.config.allow_skip and run is None,
                self.spec.elastic_width and bucket is None, state.config.threshold, dense)
            run_logit = logits[:, 0] if run is None else None
        # pinned values are the same for every sample: filled on the device (a host copy would break a capture)
        run_t = routed_run if run is None else torch.full((batch,), run[0], device=device)
        bucket_t = routed_bucket if bucket is None else torch.full((batch,), bucket[0], device=device)
        inputs = self.residual_inputs(arguments)
        reuse_t = entry = None
        if cache is not None:
            run_t, reuse_t, entry = self.device_cache_policy(cache, run_t, run_logit, inputs, batch)
        state.record(BlockCall(self.index, run if run is not None and reuse_t is None else run_t,
                               bucket if bucket is not None else bucket_t, router_ran,
                               reuse_t if reuse_t is not None else []))
        outputs, constants = self.output_buffers(inputs, meta, missing, missing_tensors, device, reuse_t, entry)
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
                    self.control.unit_masks = self.own_width_masks(bucket_t, b, device)
                try:
                    leaves, _ = flatten_output(self.run_plan((True, b), args, kwargs, arguments))
                finally:
                    self.control.unit_masks = None
                rows = None if whole else run_t & (widest == b)
                for i, out in outputs.items():
                    if whole:
                        out.copy_(leaves[i])
                    else:
                        out.copy_(torch.where(per_sample(rows, out), leaves[i], out))
            branches.run_if(wanted[b], body)
        if entry is not None:
            self.device_cache_store(entry, inputs, outputs, run_t, reuse_t)
        return pytree.tree_unflatten([outputs[i] if i in outputs else constants[i]
                                      for i in range(self.spec.num_output_leaves)], self.output_spec)

    def output_buffers(self, inputs: dict, meta: list, missing: list[int], missing_tensors: list[int], device,
                       reuse: torch.Tensor | None = None, entry=None):
        """Device routing's output: the skip output (residual inputs, plus the cached delta for rows in ``reuse``)
        as buffers the running bucket writes into; for a block that always runs, empty buffers shaped like its
        other outputs; non-tensor outputs."""
        outputs = {}
        for i, x in inputs.items():
            if reuse is None:
                outputs[i] = x.clone()
            else:
                outputs[i] = torch.where(per_sample(reuse, x), x + entry.deltas[i], x)
        outputs.update({i: torch.empty(meta[i][0], dtype=meta[i][1], device=device) for i in missing_tensors})
        constants = {i: meta[i].value for i in missing if i not in missing_tensors}
        return outputs, constants

    def device_cache_policy(self, cache, run: torch.Tensor, run_logit: torch.Tensor | None, inputs: dict, batch: int):
        """``apply_cache_policy`` on device tensors: ``(run, reuse, entry)`` after the feature cache's rules."""
        entry = cache.device_entry(self.index, inputs, batch)
        usable = entry.valid & (entry.reuse < cache.config.max_reuse)
        band = cache.config.band
        if band is None:
            reuse = run.logical_not() & usable
        elif run_logit is None:
            reuse = torch.zeros_like(run)
        else:  # p in [tau, tau + band): run, but barely -> reuse (a NaN logit compares False: it runs)
            limit = self.state.config.threshold + band
            reuse = run & usable & (run_logit < (run_logit_threshold(limit) if limit < 1.0 else math.inf))
            run = run & reuse.logical_not()
        if cache.config.fallback == "run":  # no identity skips: reuse when possible, else run
            reuse = reuse | (run.logical_not() & usable)
            run = run | reuse.logical_not()
        return run, reuse, entry

    @staticmethod
    def device_cache_store(entry, inputs: dict, outputs: dict, run: torch.Tensor, reuse: torch.Tensor) -> None:
        """The cache's ``store`` and reuse counting in place: ``delta = out - in`` for rows that ran (their
        counters restart), one more reuse for rows that took their delta."""
        for i, delta in entry.deltas.items():
            x = inputs[i]
            delta.copy_(torch.where(per_sample(run, x), outputs[i] - x, delta))
        entry.reuse.copy_(torch.where(run, 0, entry.reuse + reuse.long()))
        entry.valid.logical_or_(run)

    def own_width_masks(self, sample_buckets: torch.Tensor, running: int, device) -> dict[int, torch.Tensor]:
        """Per FFN site, (B, units at bucket ``running``): 1 for the units of each sample's own bucket, else 0."""
        width = self.state.config.width_buckets[running]
        return {k: prefix.index_select(0, sample_buckets)[:, :self.spec.sites[k].units_at(width)]
                for k, prefix in enumerate(self.prefix_masks(device))}

    def output_meta(self, args, kwargs) -> list:
        """Per output leaf for these inputs: ``(shape, dtype)`` of a tensor, else ``Constant(value)``; from a dense
        forward on fake tensors (no compute), cached per input signature."""
        from torch._subclasses.fake_tensor import FakeTensorMode
        key = tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else repr(t)
                    for t in pytree.tree_leaves((args, kwargs)))
        cache = self.__dict__.setdefault("_output_meta", {})
        if key not in cache:
            with FakeTensorMode(allow_non_fake_inputs=True):
                leaves, _ = flatten_output(self.original_forward(*args, **kwargs))
            cache[key] = [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else Constant(t) for t in leaves]
        return cache[key]

    def soft_forward(self, args, kwargs, arguments: dict, batch: int):
        """Training path: decisions stay differentiable through straight-through estimators.

        Every sample runs the dense block with a per-sample unit mask ``m = m_hard + m_soft - sg(m_soft)``
        (``m_soft = softmax(width_logits) @ prefix_masks``) and its output is ``x + g * (block(x) - x)`` with
        ``g = 1[p >= tau] + p - sg(p)``: forward values equal the hard decisions, gradients reach the logits.
        With cache-aware training (``state.soft_skip_deltas``), a skip adds the previous step's update:
        ``x + g * (block(x) - x) + (1 - g) * delta_prev``.
        Records ``(block, p_run, width_probs, hard_run, hard_bucket)`` for the compute-budget term.
        """
        state, dense = self.state, self.state.dense_bucket
        if self.router is None:
            state.soft_records.append((self.index, None, None, None, None))
            state.record(BlockCall(self.index, [True] * batch, [dense] * batch, False))
            return self.original_forward(*args, **kwargs)
        run_logit, width_logits = self.router(arguments)
        can_skip = self.spec.skippable and state.config.allow_skip
        p_run = torch.sigmoid(run_logit.float()) if can_skip else None
        probs = torch.softmax(width_logits.float(), dim=-1) if self.spec.elastic_width else None
        hard_run = p_run >= state.config.threshold if p_run is not None else torch.ones(batch, dtype=torch.bool)
        hard_bucket = probs.argmax(dim=-1) if probs is not None else torch.full((batch,), dense)
        if probs is not None:
            masks = {}
            for site_index, prefix in enumerate(self.prefix_masks(probs.device)):
                soft = probs @ prefix
                masks[site_index] = prefix[hard_bucket] + soft - soft.detach()
            self.control.unit_masks = masks
        try:
            out = self.original_forward(*args, **kwargs)
        finally:
            self.control.unit_masks = None
        state.soft_records.append((self.index, p_run, probs, hard_run, hard_bucket))
        state.record(BlockCall(self.index, hard_run.tolist(), hard_bucket.tolist(), True))
        if p_run is None:
            return out
        gate = hard_run.to(p_run.dtype) + p_run - p_run.detach()
        leaves, _ = flatten_output(out)
        cached = (state.soft_skip_deltas or {}).get(self.index, {})
        for i, name in self.spec.residual_of.items():
            x = arguments[name]
            g = per_sample(gate.to(x.dtype), x)
            leaves[i] = x + g * (leaves[i] - x)
            if i in cached:  # a skipped sample takes the previous step's update, as the feature cache serves it
                leaves[i] = leaves[i] + (1 - g) * cached[i].to(x.dtype)
        return pytree.tree_unflatten(leaves, self.output_spec)

    def prefix_masks(self, device) -> list[torch.Tensor]:
        """Per FFN site, a (buckets, hidden) 0/1 matrix: row k keeps the first units(bucket k) units."""
        if getattr(self, "_prefix_masks", None) is None or self._prefix_masks[0].device != torch.device(device):
            buckets = self.state.config.width_buckets
            self._prefix_masks = [
                (torch.arange(site.hidden)[None, :] < torch.tensor([site.units_at(b) for b in buckets])[:, None])
                .float().to(device) for site in self.spec.sites]
        return self._prefix_masks

    def residual_inputs(self, arguments: dict) -> dict[int, torch.Tensor]:
        return {i: arguments[name] for i, name in self.spec.residual_of.items()}

    def skip_output(self, arguments: dict, reuse: list[bool] | None = None):
        """The block's output when skipped: its residual inputs, plus cached deltas for samples in ``reuse``."""
        values = self.residual_inputs(arguments)
        if reuse is not None and self.state.cache is not None:
            values = self.state.cache.reused_output(self.index, values, reuse)
        leaves = [values.get(i) for i in range(self.spec.num_output_leaves)]
        return pytree.tree_unflatten(leaves, self.output_spec)

    def run_mixed(self, run: list[bool], bucket: list[int], reuse: list[bool], args, kwargs, arguments, batch: int):
        """Skipped rows from ``skip_output``; each group of samples sharing a bucket runs as one sub-batch."""
        full = [None] * self.spec.num_output_leaves
        if not all(run):
            full, _ = flatten_output(self.skip_output(arguments, reuse))
        groups: dict[int, list[int]] = {}
        for sample, (r, b) in enumerate(zip(run, bucket)):
            if r:
                groups.setdefault(b, []).append(sample)
        for b, samples in groups.items():
            index = torch.tensor(samples, dtype=torch.long, device=_device_of(args, kwargs))
            sub_args, sub_kwargs = _select_batch((args, kwargs), index, batch)
            sub_arguments = self.bind(sub_args, sub_kwargs)
            leaves, _ = flatten_output(self.run_plan((True, b), sub_args, sub_kwargs, sub_arguments))
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    if full[i] is None:
                        full[i] = leaf.new_empty((batch,) + tuple(leaf.shape[1:]))
                    full[i] = full[i].index_copy(0, index, leaf)
        return pytree.tree_unflatten(full, self.output_spec)


@dataclass(frozen=True)
class Constant:
    """A non-tensor output leaf of a block (e.g. the ``None`` a last joint block returns for its context)."""

    value: object


def _device_of(args, kwargs) -> torch.device:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def _select_batch(tree, index: torch.Tensor, batch: int):
    """Rows ``index`` of every tensor whose leading dimension is the batch; other values pass unchanged."""
    return pytree.tree_map(
        lambda x: x.index_select(0, index) if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch else x,
        tree)

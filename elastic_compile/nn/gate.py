"""The block gate: per sample, skip the block or run it at a width bucket, as its router (or ``force``) says.

Samples that share a plan run together as one sub-batch; skipped samples take their residual inputs as
outputs. The gate replaces the block's ``forward`` on the instance (the block keeps its class, parameters and
state-dict keys) and restores the block's output structure exactly.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from ..analysis.blocks import flatten_output
from ..analysis.spec import BlockSpec
from ..capture.record import bind_to_signature
from ..runtime.state import BlockCall, ElasticState
from .router import Router
from .sliced import WidthControl


class BlockGate:
    """Callable installed as ``block.forward``."""

    def __init__(self, block: nn.Module, spec: BlockSpec, router: Router | None, control: WidthControl,
                 state: ElasticState, original_forward):
        self.block_ref = block
        self.spec = spec
        self.router = router
        self.control = control
        self.state = state
        self.original_forward = original_forward
        self.output_spec = pytree.treespec_loads(spec.output_spec)
        self.signature = inspect.signature(original_forward)

    @property
    def index(self) -> int:
        return self.spec.index

    # decisions -------------------------------------------------------------------------------------------
    def stream_batch(self, arguments: dict) -> int:
        for name in list(self.spec.residual_of.values()) + [f.name for f in self.spec.features]:
            value = arguments.get(name)
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
        raise RuntimeError(f"block {self.spec.path} was called without its hidden-state input")

    def decide(self, arguments: dict, batch: int) -> tuple[list[bool], list[int], bool]:
        state, dense = self.state, self.state.dense_bucket
        can_skip = self.spec.skippable and state.config.allow_skip
        run = bucket = None
        forced = state.forced
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
        if run is not None and bucket is not None:
            return run, bucket, False
        run_logit, width_logits = self.router(arguments)
        if run is None:
            run = (torch.sigmoid(run_logit.float()) >= state.config.threshold).tolist()
        if bucket is None:
            bucket = width_logits.argmax(dim=-1).tolist()
        return run, bucket, True

    # execution -------------------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        arguments = bind_to_signature(self.signature, args, kwargs)
        batch = self.stream_batch(arguments)
        if self.state.soft and self.state.forced is None and not self.state.profiling:
            return self.soft_forward(args, kwargs, arguments, batch)
        run, bucket, router_ran = self.decide(arguments, batch)
        self.state.record(BlockCall(self.index, run, bucket, router_ran))
        plans = list(zip(run, bucket))
        if self.state.profiling:
            with FlopCounterMode(display=False) as counter:
                out = self.run_plan(plans[0], args, kwargs, arguments)
            self.state.profile_sink.append((self.index, counter.get_total_flops()))
            return out
        if len(set(plans)) == 1:
            return self.run_plan(plans[0], args, kwargs, arguments)
        return self.run_grouped(plans, args, kwargs, batch)

    def run_plan(self, plan: tuple[bool, int], args, kwargs, arguments):
        run, bucket = plan
        if not run:
            return self.skip_output(arguments)
        self.control.bucket = None if bucket == self.state.dense_bucket else bucket
        try:
            return self.original_forward(*args, **kwargs)
        finally:
            self.control.bucket = None

    def soft_forward(self, args, kwargs, arguments: dict, batch: int):
        """Training path: decisions stay differentiable through straight-through estimators.

        Every sample runs the dense block with a per-sample unit mask ``m = m_hard + m_soft - sg(m_soft)``
        (``m_soft = softmax(width_logits) @ prefix_masks``) and its output is ``x + g * (block(x) - x)`` with
        ``g = 1[p >= tau] + p - sg(p)``: forward values equal the hard decisions, gradients reach the logits.
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
        for i, name in self.spec.residual_of.items():
            x = arguments[name]
            g = gate.to(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            leaves[i] = x + g * (leaves[i] - x)
        return pytree.tree_unflatten(leaves, self.output_spec)

    def prefix_masks(self, device) -> list[torch.Tensor]:
        """Per FFN site, a (buckets, hidden) 0/1 matrix: row k keeps the first units(bucket k) units."""
        if getattr(self, "_prefix_masks", None) is None or self._prefix_masks[0].device != torch.device(device):
            buckets = self.state.config.width_buckets
            self._prefix_masks = [
                (torch.arange(site.hidden)[None, :] < torch.tensor([site.units_at(b) for b in buckets])[:, None])
                .float().to(device) for site in self.spec.sites]
        return self._prefix_masks

    def skip_output(self, arguments: dict):
        leaves = [arguments[self.spec.residual_of[i]] if i in self.spec.residual_of else None
                  for i in range(self.spec.num_output_leaves)]
        return pytree.tree_unflatten(leaves, self.output_spec)

    def run_grouped(self, plans, args, kwargs, batch: int):
        groups: dict[tuple, list[int]] = {}
        for sample, plan in enumerate(plans):
            groups.setdefault(plan, []).append(sample)
        full: list = [None] * self.spec.num_output_leaves
        for plan, samples in groups.items():
            index = torch.tensor(samples, dtype=torch.long, device=_device_of(args, kwargs))
            sub_args, sub_kwargs = _select_batch((args, kwargs), index, batch)
            sub_arguments = bind_to_signature(self.signature, sub_args, sub_kwargs)
            leaves, _ = flatten_output(self.run_plan(plan, sub_args, sub_kwargs, sub_arguments))
            for i, leaf in enumerate(leaves):
                if isinstance(leaf, torch.Tensor):
                    if full[i] is None:
                        full[i] = leaf.new_empty((batch,) + tuple(leaf.shape[1:]))
                    full[i] = full[i].index_copy(0, index, leaf)
        return pytree.tree_unflatten(full, self.output_spec)


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

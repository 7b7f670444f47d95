"""What every layer of an elastic model reads: its state (forced plans, per-forward decision records, FLOP tables,
the cache and routing modes), ``force``, and where elastic_compile keeps things on a model and its blocks.

This module sits right above errors/config/capture: the gates (nn/), the passes, training, export and the
runtimes all import it, and it imports none of them (the cache, device routing and profiling objects it holds are
typed as ``object`` here and owned by their own modules).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .capture.treespec import PLAIN_LEAVES
from .config import ElasticConfig
from .errors import ConfigError, NotElasticError

#: The model attribute holding its :class:`ElasticState` (read through :func:`state_of`).
STATE_ATTRIBUTE = "_elastic_state"
#: The block attribute holding its gate (read through :func:`gate_of`).
GATE_ATTRIBUTE = "_elastic_gate"
#: The block attribute (a registered submodule) holding its router; state-dict keys start with it.
ROUTER_ATTRIBUTE = "elastic_router"


@dataclass(frozen=True)
class ForcedPlan:
    """Decisions pinned by ``force``: ``skip`` (None = router decides, a bool for every block, or a set of block
    indices) and ``width`` (None = router decides, else a bucket fraction)."""

    skip: bool | frozenset[int] | None = None
    width: float | None = None

    def skips(self, block: int) -> bool | None:
        if self.skip is None:
            return None
        return self.skip if isinstance(self.skip, bool) else block in self.skip


@dataclass
class BlockCall:
    """One call of one block during a forward: per-sample decisions."""

    block: int
    run: list[bool]
    bucket: list[int]
    router_ran: bool
    reused: list[bool] = field(default_factory=list)   # skipped samples that took the cached delta
    batched: bool = False      # ran once for the whole batch at its widest running bucket (device routing)


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


@dataclass
class ElasticState:
    """Shared by the root hook and every block gate of one elastic model."""

    config: ElasticConfig
    specs: list = field(default_factory=list)
    forced: ForcedPlan | None = None
    calls: list[BlockCall] = field(default_factory=list)
    last_inputs: Any = None
    profiling: bool = False
    profile_sink: list | None = None
    flop_tables: dict = field(default_factory=dict)
    routers: dict = field(default_factory=dict)
    soft: bool = False                                   # straight-through training decisions (train/)
    soft_records: list = field(default_factory=list)     # per block call: (block, p_run, probs, hard run, hard bucket)
    cache: object = None                                 # cache.FeatureCacheState when the cache is on
    soft_stand_ins: dict | None = None                   # cache-aware training: block -> {leaf: (actions, B, ...)}
    soft_checkpoint: bool = False                        # training: recompute each block's activations in backward
    serving: dict = field(default_factory=dict)          # how the routers were trained to be served (saved)
    device_routing: object = None                        # nn.gate.device.DeviceRouting while installed
    pending_calls: Any = None                            # () -> list[BlockCall]: decisions still on the device

    @property
    def dense_bucket(self) -> int:
        return len(self.config.width_buckets) - 1

    def bucket_index(self, width: float) -> int:
        for index, bucket in enumerate(self.config.width_buckets):
            if abs(bucket - width) < 1e-9:
                return index
        raise ConfigError(f"a width among the buckets {self.config.width_buckets}", f"{width}",
                          "Force one of the configured buckets (or transform with other width_buckets).")

    def begin_forward(self, args: tuple, kwargs: dict) -> None:
        if self.profiling:
            return
        self.calls = []
        self.soft_records = []
        self.last_inputs = describe_inputs(args, kwargs)
        self.pending_calls = None
        if self.device_routing is not None:
            self.device_routing.log = []
            self.pending_calls = self.device_routing.calls

    def record(self, call: BlockCall) -> None:
        if self.device_routing is not None:
            self.device_routing.log.append((call.block, call.run, call.bucket, call.router_ran, call.reused))
        else:
            self.calls.append(call)

    def settled_calls(self) -> list[BlockCall]:
        """The last forward's block calls, copying decisions made on the device to the host first."""
        if self.pending_calls is not None:
            self.calls = self.pending_calls()
        return self.calls


def _described(value):
    return TensorMeta(tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor) else value


def describe_inputs(args: tuple, kwargs: dict):
    """``(args, kwargs)`` with every tensor replaced by its shape/dtype/device (for FLOP profiling)."""
    if (type(args) is tuple and type(kwargs) is dict and all(isinstance(v, PLAIN_LEAVES) for v in args)
            and all(isinstance(v, PLAIN_LEAVES) for v in kwargs.values())):
        return tuple(map(_described, args)), {k: _described(v) for k, v in kwargs.items()}  # no pytree walk
    return pytree.tree_map(_described, (args, kwargs))


def state_of(model: nn.Module) -> ElasticState:
    """The elastic state of a model returned by ``transform`` / ``load`` (or of anything exposing it, such as an
    exported runtime); NotElasticError for a plain model."""
    state = getattr(model, STATE_ATTRIBUTE, None)
    if state is None:
        raise NotElasticError("a model returned by elastic_compile.transform or load",
                              f"a plain {type(model).__name__}", "Call elastic_compile.transform(model, ...) first.")
    return state


def gate_of(block: nn.Module):
    """The gate installed on ``block`` (``passes.gate_blocks``): its router, spec, width control and forwards."""
    return getattr(block, GATE_ATTRIBUTE)


@contextlib.contextmanager
def force(model: nn.Module, skip: bool | set[int] | frozenset[int] | None = None, width: float | None = None):
    """Pin decisions inside the ``with`` block.

    ``skip``: True skips every skippable block, False runs every block, a set of indices skips those blocks
    (indices count all blocks in the order they run), None lets routers decide. ``width``: a bucket fraction
    for every elastic FFN, or None to let routers decide. Nested calls restore the outer plan on exit.
    """
    state = state_of(model)
    if width is not None:
        state.bucket_index(float(width))
    if skip is not None and not isinstance(skip, bool):
        skip = frozenset(int(i) for i in skip)
        bad = sorted(i for i in skip if not 0 <= i < len(state.specs))
        if bad:
            raise ConfigError(f"block indices in [0, {len(state.specs)})", f"{bad}", "See elastic_compile.report(model).")
        unskippable = sorted(i for i in skip if not state.specs[i].skippable)
        if unskippable:
            raise ConfigError("indices of skippable blocks", f"blocks {unskippable} cannot be skipped",
                              "elastic_compile.report(model) lists which blocks can be skipped and why.")
    previous = state.forced
    state.forced = ForcedPlan(skip=skip, width=None if width is None else float(width))
    try:
        yield model
    finally:
        state.forced = previous

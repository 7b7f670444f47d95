"""What every layer of an elastic model reads: its state (forced plans, per-forward decision records, FLOP tables,
the cache and routing modes), ``force``, and where elastic_compile keeps things on a model and its blocks.

Shared and per caller. One elastic model may be called from several threads at once: what a forward writes is
kept per caller, so concurrent forwards give exactly what the same forwards give one after another. Per caller
(:class:`CallerState`, one per thread): the decision records of the last forward (``stats``), its input shapes,
the FLOP-profiling mode and the soft-training records; ``force`` is per ``contextvars`` context (the calling
thread, or an asyncio task), as :class:`ScopedValue`. Shared by every caller: the weights, the routers, the
config, the block specs, the FLOP tables (a pure function of the input shapes), and the modes set for the whole
model (router training, device routing and the CUDA graphs captured from it, which serve one caller at a time).
The feature cache keeps its rows per caller too (``elastic_compile/cache/store.py``), and so does each block's
width switch (``nn/width.py``).

This module sits right above errors/config/capture: the gates (nn/), the passes, training, export and the
runtimes all import it, and it imports none of them (the cache, device routing and profiling objects it holds are
typed as ``object`` here and owned by their own modules).
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
import weakref
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
    indices), ``width`` (None = router decides, else a bucket fraction) and ``action`` (the skip action a
    skipped sample takes, as an index into ``ElasticConfig.skip_actions``: None = the router's or the first, an
    int for every block, or ``{block: index}`` for some)."""

    skip: bool | frozenset[int] | None = None
    width: float | None = None
    action: int | dict[int, int] | None = None

    def skips(self, block: int) -> bool | None:
        if self.skip is None:
            return None
        return self.skip if isinstance(self.skip, bool) else block in self.skip

    def action_of(self, block: int) -> int | None:
        return self.action.get(block) if isinstance(self.action, dict) else self.action


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


class ScopedValue:
    """A value per ``contextvars`` context (per thread; an asyncio task starts from its creator's): ``get``,
    ``set`` (for the rest of this context), and ``scoped(value)`` (a token to ``restore``). A deep copy of its
    owner starts unset."""

    __slots__ = ("_var",)

    def __init__(self, name: str):
        self._var = contextvars.ContextVar(name)

    def get(self, default=None):
        return self._var.get(default)

    def set(self, value) -> None:
        self._var.set(value)

    def scoped(self, value) -> contextvars.Token:
        return self._var.set(value)

    def restore(self, token: contextvars.Token) -> None:
        self._var.reset(token)

    def __deepcopy__(self, memo):
        return ScopedValue(self._var.name)

    def __copy__(self):
        return ScopedValue(self._var.name)


class PerThread(threading.local):
    """Base of per-caller records: each thread sees its own attributes (set by ``__init__`` on first use in that
    thread). A copy (``copy.deepcopy`` of a model) is a fresh one, so copies never share records."""

    def __deepcopy__(self, memo):
        return type(self)()

    def __copy__(self):
        return type(self)()


class CallerState(PerThread):
    """What one caller's forwards write (per thread): the last forward's block calls and input shapes, decisions
    still on the device, soft-training records, and the FLOP-profiling mode of ``stats``."""

    def __init__(self):
        self.calls: list[BlockCall] = []
        self.last_inputs: Any = None
        self.last_tensors: Any = None                    # the last forward's (args, kwargs), tensors as weak refs
        self.pending_calls: Any = None                   # () -> list[BlockCall]: decisions still on the device
        self.soft_records: list = []                     # per block call: (block, p_run, probs, hard run, hard bucket)
        self.profiling = False
        self.profile_sink: list | None = None


def _per_caller(name: str) -> property:
    """A property of ElasticState read from and written to the calling thread's :class:`CallerState`."""
    return property(lambda self: getattr(self.caller, name), lambda self, value: setattr(self.caller, name, value),
                    doc=f"The calling thread's ``{name}`` (see :class:`CallerState`).")


@dataclass(eq=False)
class ElasticState:
    """Shared by the root hook and every block gate of one elastic model (what is shared and what is per caller:
    the module docstring)."""

    config: ElasticConfig
    specs: list = field(default_factory=list)
    flop_tables: dict = field(default_factory=dict)
    routers: dict = field(default_factory=dict)
    soft: bool = False                                   # straight-through training decisions (train/)
    cache: object = None                                 # cache.FeatureCacheState when the cache is on
    soft_stand_ins: dict | None = None                   # cache-aware training: block -> {leaf: (actions, B, ...)}
    soft_checkpoint: bool = False                        # training: recompute each block's activations in backward
    serving: dict = field(default_factory=dict)          # how the routers were trained to be served (saved)
    device_routing: object = None                        # nn.gate.device.DeviceRouting while installed
    left_dense: dict = field(default_factory=dict)       # block-like modules the transform left dense -> why
    caller: CallerState = field(default_factory=CallerState, repr=False)
    forced_plan: ScopedValue = field(default_factory=lambda: ScopedValue("elastic_compile.forced"), repr=False)

    calls = _per_caller("calls")
    last_inputs = _per_caller("last_inputs")
    last_tensors = _per_caller("last_tensors")
    pending_calls = _per_caller("pending_calls")
    soft_records = _per_caller("soft_records")
    profiling = _per_caller("profiling")
    profile_sink = _per_caller("profile_sink")

    @property
    def forced(self) -> ForcedPlan | None:
        """The plan ``force`` pins in the calling context (None: routers decide)."""
        return self.forced_plan.get()

    @forced.setter
    def forced(self, plan: ForcedPlan | None) -> None:
        self.forced_plan.set(plan)

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
        caller = self.caller
        if caller.profiling:
            return
        caller.calls = []
        caller.soft_records = []
        caller.last_inputs = describe_inputs(args, kwargs)
        caller.last_tensors = weak_inputs(args, kwargs)
        caller.pending_calls = None
        if self.device_routing is not None:
            self.device_routing.log = []
            caller.pending_calls = self.device_routing.calls
        if self.cache is not None:
            self.cache.begin_call(args, kwargs)  # a new generation resets the caller's rows (cache/store.py)

    def record(self, call: BlockCall) -> None:
        if self.device_routing is not None:
            self.device_routing.log.append((call.block, call.run, call.bucket, call.router_ran, call.reused))
        else:
            self.caller.calls.append(call)

    def settled_calls(self) -> list[BlockCall]:
        """The calling thread's last forward's block calls, copying decisions made on the device to the host first."""
        caller = self.caller
        if caller.pending_calls is not None:
            caller.calls = caller.pending_calls()
        return caller.calls


def _described(value):
    return TensorMeta(tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor) else value


def describe_inputs(args: tuple, kwargs: dict):
    """``(args, kwargs)`` with every tensor replaced by its shape/dtype/device (for FLOP profiling)."""
    if (type(args) is tuple and type(kwargs) is dict and all(isinstance(v, PLAIN_LEAVES) for v in args)
            and all(isinstance(v, PLAIN_LEAVES) for v in kwargs.values())):
        return tuple(map(_described, args)), {k: _described(v) for k, v in kwargs.items()}  # no pytree walk
    return pytree.tree_map(_described, (args, kwargs))


def _weak(value):
    return weakref.ref(value) if isinstance(value, torch.Tensor) else value


def weak_inputs(args: tuple, kwargs: dict):
    """``(args, kwargs)`` with every tensor held by a weak reference: FLOP profiling of a forward that reads
    tensor values runs on the real inputs while the caller still holds them, and keeps nothing alive."""
    if (type(args) is tuple and type(kwargs) is dict and all(isinstance(v, PLAIN_LEAVES) for v in args)
            and all(isinstance(v, PLAIN_LEAVES) for v in kwargs.values())):
        return tuple(map(_weak, args)), {k: _weak(v) for k, v in kwargs.items()}
    return pytree.tree_map(_weak, (args, kwargs))


def strong_inputs(weak):
    """The tensors behind :func:`weak_inputs` (None when one of them is gone)."""
    leaves, spec = pytree.tree_flatten(weak)
    values = [leaf() if isinstance(leaf, weakref.ref) else leaf for leaf in leaves]
    if any(isinstance(leaf, weakref.ref) and value is None for leaf, value in zip(leaves, values)):
        return None
    return pytree.tree_unflatten(values, spec)


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


def _check_block_indices(state, indices) -> None:
    """Refuse block indices outside the model's blocks (``force``'s ``skip`` and ``action`` alike)."""
    bad = sorted(i for i in indices if not 0 <= i < len(state.specs))
    if bad:
        raise ConfigError(f"block indices in [0, {len(state.specs)})", f"{bad}", "See elastic_compile.report(model).")


def _action_indices(state, action) -> int | dict[int, int] | None:
    """``force``'s ``action`` as skip-action indices (``ForcedPlan.action``), refused where a name or block is
    not the model's."""
    if action is None:
        return None
    names = state.config.skip_actions
    for name in action.values() if isinstance(action, dict) else [action]:
        if name not in names:
            raise ConfigError(f"a skip action among the model's {names}", repr(name),
                              "Transform with ElasticConfig(skip_actions=...) including it.")
    if not isinstance(action, dict):
        return names.index(action)
    _check_block_indices(state, action)
    return {int(block): names.index(name) for block, name in action.items()}


@contextlib.contextmanager
def force(model: nn.Module, skip: bool | set[int] | frozenset[int] | None = None, width: float | None = None,
          action: str | dict[int, str] | None = None):
    """Pin decisions inside the ``with`` block.

    ``skip``: True skips every skippable block, False runs every block, a set of indices skips those blocks
    (indices count all blocks in the order they run), None lets routers decide. ``width``: a bucket fraction
    for every elastic FFN, or None to let routers decide. ``action``: the skip action (one of
    ``ElasticConfig.skip_actions``) a skipped sample's stand-in takes with the feature cache on, for every block
    or per block index (``{block: name}``); None: the router's choice, or the first action where no router
    chose. Nested calls restore the outer plan on exit.
    """
    state = state_of(model)
    action = _action_indices(state, action)
    if width is not None:
        state.bucket_index(float(width))
    if skip is not None and not isinstance(skip, bool):
        skip = frozenset(int(i) for i in skip)
        _check_block_indices(state, skip)
        unskippable = sorted(i for i in skip if not state.specs[i].skippable)
        if unskippable:
            raise ConfigError("indices of skippable blocks", f"blocks {unskippable} cannot be skipped",
                              "elastic_compile.report(model) lists which blocks can be skipped and why.")
    token = state.forced_plan.scoped(ForcedPlan(skip=skip, width=None if width is None else float(width),
                                                action=action))
    try:
        yield model
    finally:
        state.forced_plan.restore(token)

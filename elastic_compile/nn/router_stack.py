"""All routers of one elastic model, stacked for CPU inference: shared work done once per forward.

Between two eager PyTorch blocks every small operation is several times slower than in a warm loop (the block
just streamed its weights through the caches, code included), so a router's cost is mostly its count of
operations and Python lines, not its arithmetic. Per router call, the plain inference path
(:meth:`Router.logits <elastic_compile.nn.router.Router.logits>` without a stack) checks its folded weights'
version counters and multiplies each feature that every router reads (the conditioning vector, the timestep)
by its own slice of ``fc1``. :class:`RouterStack` does both once per forward for all routers:

- the folded weights of every router are checked (and refolded if a parameter changed) at the first router call
  of a forward, not at every call;
- per shared feature (vector or scalar kind, same name, dimension, epsilon, dtype and frequency count), the
  ``fc1`` columns of every router that reads it are stacked: one GEMM per distinct tensor gives every router's
  contribution, with each router's ``fc1`` bias folded into the first shared feature it reads. A router then
  starts from its slice and adds only its pooled token streams.

Guarantees: the same function as the router's own path, up to float32 rounding (summation order); a tensor
served again is the very tensor, unmodified (identity and version counter); a router the stack does
not know (replaced after ``transform``, or a proxy) and calls outside the model's forward use the router's own
path. Parameters changed *during* a forward (between two blocks) are not seen until the next forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

SHARED_KINDS = ("vector", "scalar")


@dataclass
class StackedFeature:
    """``fc1`` columns of every router reading one shared feature: ``weight (dim, sum H)``, ``bias (sum H)``."""

    weight: torch.Tensor
    bias: torch.Tensor
    sizes: list[int]


@dataclass
class StackMember:
    """One router's view of the stack: per shared feature ``(name, key, slot)`` (``slot``: its columns' index in
    the stacked GEMM's split), and its other ``fc1`` blocks ``(feature, weight, eps)``."""

    router: object
    folded: dict
    shared: list = field(default_factory=list)
    own: list = field(default_factory=list)


class RouterStack:
    """Built from ``routers()`` (the model's routers in block order) lazily and rebuilt whenever one of them
    refolded its weights. ``begin_forward()`` (from the model's root hook) arms the once-per-forward check."""

    def __init__(self, routers):
        self._routers = routers
        self._checked = False
        self._built_from: list[int] | None = None
        self.members: dict[int, StackMember] = {}
        self.stacks: dict[tuple, StackedFeature] = {}
        self.last: dict[tuple, tuple] = {}  # key -> (tensor, its version, per-router terms)

    def begin_forward(self) -> None:
        self._checked = False

    def start(self, router, arguments: dict) -> tuple[StackMember, torch.Tensor] | None:
        """``(member, fc1_bias + sum over shared features of LN(feature) @ W_feature)`` for this router, its folded
        weights checked in this forward; None: a router the stack does not know (use its own path)."""
        if not self._checked:
            self._check()
        member = self.members.get(id(router))
        if member is None or member.router is not router:
            return None
        start = None
        for name, key, slot in member.shared:
            value = arguments[name]
            # inline identity + version check: this runs between two blocks, where each Python call is slow
            last = self.last.get(key)
            if last is not None and last[0] is value and last[1] == value._version:
                parts = last[2]
            else:
                parts = self._products(member, key, value)
            start = parts[slot] if start is None else start + parts[slot]
        return member, (member.folded["fc1_bias"] if start is None else start)

    def _products(self, member: StackMember, key: tuple, value: torch.Tensor) -> list[torch.Tensor]:
        """Every stacked router's ``fc1`` term for ``value`` (one GEMM), split per router; remembered for
        ``value`` as it is now (the stack holds the last tensor of each shared feature until the next one)."""
        stacked = self.stacks[key]
        feature = next(f for f in member.router.features if f.name == key[0])
        normed = member.router.normalized(feature, value, key[3], key[4])
        parts = torch.addmm(stacked.bias, normed, stacked.weight).split(stacked.sizes, dim=1)
        self.last[key] = (value, value._version, parts)
        return parts

    def _check(self) -> None:
        from .router import Router
        routers = [r for r in self._routers() if isinstance(r, Router)]
        folded = [r.folded() for r in routers]
        if [id(f) for f in folded] != self._built_from:  # a router refolded, or another set of routers
            self._build(routers, folded)
        self._checked = True

    def _build(self, routers: list, folded: list[dict]) -> None:
        self.members, self.last = {}, {}
        columns: dict[tuple, list] = {}  # key -> [(member, weight, bias or None)]
        for router, weights in zip(routers, folded):
            if not weights["cpu"]:
                continue
            member = StackMember(router, weights)
            for feature, weight, eps in weights["fc1"]:
                if feature.kind not in SHARED_KINDS:
                    member.own.append((feature, weight, eps))
                    continue
                key = shared_key(router, feature, eps, weights["dtype"])
                bias = weights["fc1_bias"] if not member.shared else None
                member.shared.append((feature.name, key, len(columns.setdefault(key, []))))
                columns[key].append((weight, bias))
            self.members[id(router)] = member
        self.stacks = {}
        for key, entries in columns.items():
            weight = torch.cat([w for w, _ in entries], dim=1)
            bias = torch.cat([b if b is not None else w.new_zeros(w.shape[1]) for w, b in entries])
            self.stacks[key] = StackedFeature(weight, bias, [w.shape[1] for w, _ in entries])
        self._built_from = [id(f) for f in folded]


def shared_key(router, feature, eps: float, dtype: torch.dtype) -> tuple:
    """Routers whose shared feature has the same key compute the same normalised input from the same tensor."""
    frequencies = router.frequencies.shape[0] if feature.kind == "scalar" else 0
    return (feature.name, feature.kind, feature.dim, eps, dtype, frequencies)

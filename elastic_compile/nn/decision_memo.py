"""Decisions of routers that read scalar features only (a timestep), kept per distinct value.

A router whose read features are all scalars computes the same logits for the same scalar values: a schedule
router (``train.fit_schedule_routers``) reads the timestep and nothing else, and a sampler calls every block's
router with the same few timesteps, generation after generation. The host gate then decides once per distinct
(values, batch, threshold) and serves that decision again: one dictionary lookup instead of the router's matrix
products and the per-sample decision loop, which on small blocks is a few percent of a step (the schedule routers
against the router-free forecast in ``benchmarks/results/quality.md``).

Guarantee: a served decision is the one the router computed for the same scalar values, batch size and threshold
with the same weights (the memo belongs to the router's folded weights, which are rebuilt, memo included, when a
weight changes). Routers that read any other feature (a token summary, a conditioning vector) have no memo.
"""
from __future__ import annotations

from collections.abc import Hashable

import torch

from .memo import TensorMemo

#: Host values of the scalar tensors routers key their memos by: one device-to-host copy per tensor, for all
#: routers of the forward.
SCALAR_VALUES = TensorMemo()
#: Scalars of more elements than this (not a timestep per sample) are not keyed by value.
MAX_ELEMENTS = 4096


class DecisionMemo:
    """Per ``key`` (:meth:`key`), a router's decisions; at most ``capacity`` of them (then it starts over: a
    sampler's timesteps are far fewer). Shared by threads: entries are written whole and never change."""

    def __init__(self, read: list, unread: list, rows_of, capacity: int = 1024):
        self.read, self.unread, self.rows_of, self.capacity = list(read), list(unread), rows_of, capacity
        self.entries: dict[Hashable, tuple] = {}
        self.hits = 0

    def key(self, arguments: dict, threshold: float) -> tuple | None:
        """The read scalars' values, the batch the unread features give, and ``threshold``; None when a read
        scalar is too large to key by value."""
        key: list = [threshold]
        for feature in self.read:
            value = arguments[feature.name]
            if not isinstance(value, torch.Tensor) or value.numel() > MAX_ELEMENTS:
                return None
            values = SCALAR_VALUES.lookup(value, "values")
            if values is None:
                values = tuple(value.detach().reshape(-1).tolist())
                SCALAR_VALUES.remember(value, "values", values)
            key.append(values)
        if self.unread:
            key.append(max(self.rows_of(f, arguments[f.name]) for f in self.unread))
        return tuple(key)

    def get(self, key: tuple) -> tuple | None:
        found = self.entries.get(key)
        if found is not None:
            self.hits += 1
        return found

    def put(self, key: tuple, decided: tuple) -> None:
        if len(self.entries) >= self.capacity:
            self.entries = {}
        self.entries[key] = decided


def memo_for(read: list, unread: list, rows_of) -> DecisionMemo | None:
    """A memo for a router that reads the features ``read`` (weights not all zero) and ignores ``unread``: one
    where every read feature is a scalar, else None. ``rows_of(feature, value)``: the rows an unread feature
    gives the batch (the router's own rule, ``nn.router.feature_rows``)."""
    return DecisionMemo(read, unread, rows_of) if all(f.kind == "scalar" for f in read) else None

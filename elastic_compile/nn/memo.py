"""Values derived from live tensors, served again only for that very tensor, unmodified.

Routers use it to compute a shared input once per forward (a conditioning vector that every block's router
reads, a token summary that a block graph already computed): the key is the tensor's identity plus a tag (what
was derived, with which epsilon and dtype), and a hit also requires the same version counter, so an in-place
change or another tensor with equal values is always a miss. Keys are weak: the memo never keeps a tensor alive,
and a new tensor that reuses a dead one's ``id`` is a miss.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Hashable

import torch


class TensorMemo:
    """At most ``capacity`` entries (the most recent ones); ``hits`` / ``misses`` count lookups."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, Hashable], tuple[weakref.ref, int, Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def remember(self, tensor: torch.Tensor, tag: Hashable, value: Any) -> None:
        key = (id(tensor), tag)
        self._entries.pop(key, None)
        self._entries[key] = (weakref.ref(tensor), tensor._version, value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def lookup(self, tensor: torch.Tensor, tag: Hashable) -> Any | None:
        entry = self._entries.get((id(tensor), tag))
        if entry is not None and entry[0]() is tensor and entry[1] == tensor._version:
            self.hits += 1
            return entry[2]
        self.misses += 1
        return None

    def reset(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

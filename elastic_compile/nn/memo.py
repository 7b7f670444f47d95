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


def stamp(tensor: torch.Tensor) -> tuple[weakref.ref, int]:
    """What identifies ``tensor`` as it is now: a weak reference and its version counter."""
    return weakref.ref(tensor), tensor._version


def is_stamped(value, stamp_: tuple[weakref.ref, int]) -> bool:
    """Whether ``value`` is the very tensor of ``stamp_``, not modified in place since."""
    return stamp_[0]() is value and isinstance(value, torch.Tensor) and value._version == stamp_[1]


class TensorMemo:
    """At most ``capacity`` entries (the most recent ones); ``hits`` / ``misses`` count lookups."""

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, Hashable], tuple[tuple[weakref.ref, int], Any]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def remember(self, tensor: torch.Tensor, tag: Hashable, value: Any) -> None:
        key = (id(tensor), tag)
        self._entries.pop(key, None)
        self._entries[key] = (stamp(tensor), value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def lookup(self, tensor: torch.Tensor, tag: Hashable) -> Any | None:
        entry = self._entries.get((id(tensor), tag))
        if entry is not None and is_stamped(tensor, entry[0]):
            self.hits += 1
            return entry[1]
        self.misses += 1
        return None

    def reset(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

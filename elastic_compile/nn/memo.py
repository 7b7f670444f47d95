"""Values derived from live tensors, served again only for that very tensor, unmodified.

Routers use it to compute a shared input once per forward (a conditioning vector that every block's router
reads, a token summary that a block graph already computed): the key is the tensor's identity plus a tag (what
was derived, with which epsilon and dtype), and a hit also requires the same version counter, so an in-place
change or another tensor with equal values is always a miss. Keys are weak: the memo never keeps a tensor alive,
and a new tensor that reuses a dead one's ``id`` is a miss.

Entries are per thread (``threading.local``): concurrent forwards never evict or read each other's entries, so a
hit or a miss is what the same forward gets alone. ``hits`` / ``misses`` count every thread's lookups.
"""
from __future__ import annotations

import threading
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


class _ThreadEntries(threading.local):
    """One entries dict per thread, made by ``factory`` on the thread's first use."""

    def __init__(self, factory):
        self.factory = factory
        self.entries = factory()

    def __deepcopy__(self, memo):
        return _ThreadEntries(self.factory)


class StampedEntries:
    """What the memos here share: their entries (the calling thread's), ``hits`` / ``misses`` of their lookups,
    and ``reset`` (of the calling thread's entries)."""

    def __init__(self, factory=dict):
        self._local = _ThreadEntries(factory)
        self.hits = 0
        self.misses = 0

    @property
    def _entries(self) -> dict:
        return self._local.entries

    def _served(self, value: Any | None) -> Any | None:
        """Count a lookup's answer (None: a miss) and return it."""
        if value is None:
            self.misses += 1
        else:
            self.hits += 1
        return value

    def reset(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0


class TensorMemo(StampedEntries):
    """At most ``capacity`` entries (the most recent ones); ``hits`` / ``misses`` count lookups."""

    def __init__(self, capacity: int = 32):
        super().__init__(OrderedDict)
        self.capacity = capacity

    def remember(self, tensor: torch.Tensor, tag: Hashable, value: Any) -> None:
        entries, key = self._entries, (id(tensor), tag)
        if key in entries:
            del entries[key]  # re-inserted last: the most recent
        entries[key] = (stamp(tensor), value)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def lookup(self, tensor: torch.Tensor, tag: Hashable) -> Any | None:
        entry = self._entries.get((id(tensor), tag))
        return self._served(entry[1] if entry is not None and is_stamped(tensor, entry[0]) else None)

    def replace(self, tensor: torch.Tensor, tag: Hashable, value: Any) -> None:
        """A new value for an entry that :meth:`lookup` just served (a converted form of it), stamp kept."""
        key = (id(tensor), tag)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries[key] = (entry[0], value)

"""Router summaries of block outputs, computed inside the block graphs and handed to the next block's router.

A router's "pooled" feature is the mean of a token stream over its token dimensions, then layer-normalised. In
an exported runtime that stream is usually the previous block's output, which its graph has just written: the
graph computes the summary (``export.program.token_summary``: token mean, LayerNorm without affine) while the
data is still in cache, and the runtime remembers it here, keyed by the identity of the output tensor that the
model passes on. A router asks for the summary of the tensor it was given and gets it only if it is that very
tensor, unmodified, summarised with the router's own LayerNorm epsilon; anything else (glue code between
blocks, a cache-reuse output, a mixed batch) is a miss and the router computes the feature itself. Hits
therefore never change a decision beyond float32 rounding.

Routers also share their layer-normalised "vector" features here (a conditioning vector such as DiT's ``c`` is
one tensor read by every block's router): the first router of a forward normalises it, the others reuse it.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict

import numpy as np
import torch


class PooledSummaries:
    """Maps a live tensor (by identity and version counter) to its summary: a float32 NumPy array
    ``(batch, channels)``, so routers on the host read it without another PyTorch call.

    Holds at most ``capacity`` entries (the most recent ones) and never keeps a stream alive: keys are weak.
    """

    def __init__(self, capacity: int = 32):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[int, str], tuple[weakref.ref, int, float, np.ndarray]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def remember(self, stream: torch.Tensor, summary: torch.Tensor | np.ndarray, eps: float,
                 kind: str = "pooled") -> None:
        """Store ``summary`` of ``stream``: kind "pooled" is the token-mean summary ``(B, C)`` of a token stream,
        kind "vector" a layer-normalised ``(B, features)`` vector."""
        if summary.shape[0] != stream.shape[0] or (kind == "pooled" and summary.shape[-1] != stream.shape[-1]):
            return  # not a summary of this stream: never serve a wrong value
        key = (id(stream), kind)
        self._entries.pop(key, None)
        array = summary.numpy(force=True) if isinstance(summary, torch.Tensor) else summary
        self._entries[key] = (weakref.ref(stream), stream._version, float(eps),
                              array if array.dtype == np.float32 else array.astype(np.float32))
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def lookup(self, stream: torch.Tensor, eps: float, kind: str = "pooled") -> np.ndarray | None:
        """The summary of ``stream`` normalised with ``eps``; None for another tensor, a tensor modified in place
        since, or another epsilon."""
        entry = self._entries.get((id(stream), kind))
        if entry is not None and entry[0]() is stream and entry[1] == stream._version and entry[2] == eps:
            self.hits += 1
            return entry[3]
        self.misses += 1
        return None

    def reset(self) -> None:
        self._entries.clear()
        self.hits = self.misses = 0

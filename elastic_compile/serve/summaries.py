"""Router summaries of block outputs, computed inside the block graphs and handed to the next block's router.

A router's "pooled" feature is the mean of a token stream over its token dimensions, then layer-normalised. In
an exported runtime that stream is usually the previous block's output, which its graph has just written: the
graph computes the summary (``export.program.token_summary``: token mean, LayerNorm without affine) while the
data is still in cache, and the runtime remembers it here, keyed by the identity of the output tensor that the
model passes on (:class:`~elastic_compile.nn.memo.TensorMemo`). A router asks for the summary of the tensor it
was given and gets it only if it is that very tensor, unmodified, summarised with the router's own LayerNorm
epsilon; anything else (glue code between blocks, a cache-reuse output, a mixed batch) is a miss and the router
computes the feature itself. Hits therefore never change a decision beyond float32 rounding.

Host routers also share their layer-normalised "vector" and "scalar" features here (a conditioning vector such
as DiT's ``c``, a timestep: one tensor read by every block's router): the first router of a forward normalises
it, the others reuse it.
"""
from __future__ import annotations

import numpy as np
import torch

from ..nn.memo import TensorMemo


class PooledSummaries(TensorMemo):
    """Float32 NumPy arrays ``(batch, features)`` by (tensor, kind, eps): routers on the host read them without
    another PyTorch call.

    A summary is stored as given and converted on its first lookup: the executor remembers every block graph's
    summaries, but a router that takes the logits a graph computed for it (:mod:`.lookahead`) never reads them,
    and between two block graphs each conversion costs tens of microseconds (cold caches)."""

    def remember(self, stream: torch.Tensor, summary: torch.Tensor | np.ndarray, eps: float,
                 kind: str = "pooled") -> None:
        """Store ``summary`` of ``stream``: kind "pooled" is the token summary ``(B, C)`` of a token stream,
        kind "vector" a layer-normalised ``(B, features)`` vector, kind "scalar/<n>" a scalar's layer-normalised
        sinusoidal features at ``n`` frequencies."""
        if summary.shape[0] != stream.shape[0] or (kind == "pooled" and summary.shape[-1] != stream.shape[-1]):
            return  # not a summary of this stream: never serve a wrong value
        super().remember(stream, (kind, float(eps)), summary)

    def lookup(self, stream: torch.Tensor, eps: float, kind: str = "pooled") -> np.ndarray | None:
        """The summary of ``stream`` normalised with ``eps``; None for another tensor, a tensor modified in place
        since, or another epsilon."""
        tag = (kind, float(eps))
        summary = super().lookup(stream, tag)
        if summary is None or isinstance(summary, np.ndarray) and summary.dtype == np.float32:
            return summary
        array = summary.numpy(force=True) if isinstance(summary, torch.Tensor) else summary
        array = array if array.dtype == np.float32 else array.astype(np.float32)
        self.replace(stream, tag, array)
        return array

"""A router for blocks whose streams have no batch axis: it reads the whole call as one sample.

Some models hand their blocks packed token streams, ``(tokens, hidden)`` with no batch axis (Cosmos3-Omni's
understanding and generation streams of different lengths, a batch flattened to ``(B*L, D)``). Dim 0 then counts
tokens: a plain :class:`~elastic_compile.nn.router.Router` would decide per token, or fail on streams of different
lengths. This one pools each stream over all the call's tokens (and averages any other feature to one row), so it
returns one row of logits: one decision (skip, width) for the whole call, which the gate then runs as a batch of
one (``BlockGate.stream_batch``). The analysis picks it where :func:`~elastic_compile.analysis.batching.
batch_axis_problem` finds no batch axis (``BlockSpec.batch_axis``); its parameters are those of a plain router.
"""
from __future__ import annotations

import torch

from .router import Router


class CallRouter(Router):
    """:class:`Router` over the whole call as one sample: ``(1, 1 + K + A)`` logits whatever the streams' sizes."""

    def one_row(self, arguments: dict) -> dict:
        """``arguments`` with every feature as one sample: streams as ``(1, tokens, hidden)``, other features
        averaged over their rows."""
        rows = dict(arguments)
        for feature in self.features:
            value = rows[feature.name]
            if not isinstance(value, torch.Tensor):
                continue
            if feature.kind == "pooled":
                rows[feature.name] = value.reshape(1, -1, value.shape[-1])
            elif value.ndim > 0 and value.shape[0] != 1:
                rows[feature.name] = value.float().mean(0, keepdim=True)
        return rows

    def logits(self, arguments: dict) -> torch.Tensor:
        return super().logits(self.one_row(arguments))

    def featurize(self, arguments: dict) -> torch.Tensor:
        return super().featurize(self.one_row(arguments))

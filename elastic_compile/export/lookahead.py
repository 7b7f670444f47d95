"""Router lookahead: a block graph that also returns the next block's router logits.

Between two block graphs, a host router costs more than its arithmetic: each of its few small ops runs right
after a block has streamed its weights through the caches. When everything the next block's router reads is a tensor that this block's graph holds anyway
(one of its outputs, such as the hidden-state stream, or one of its inputs, such as the conditioning vector that
every block receives), the graph can evaluate that router too, next to data it already holds, and the runtime only has to
look the logits up (:mod:`elastic_compile.serve.lookahead`).

:func:`find_lookaheads` decides this per block from one real forward: router ``j``'s feature tensors must be the
very objects (identity, not equal values) that block ``i`` (the call right before ``j``) received or returned.
:class:`LookaheadProgram` is the router of ``j`` fed from block ``i``'s graph values. Guarantee: the extra output
equals ``router_j.plain_logits`` of those tensors (checked against PyTorch with the rest of the graph); the
runtime serves it only for the same tensors, unmodified, and only while router ``j`` holds the exported weights.
:class:`SegmentWithLookahead` does the same for a graph of the model's ops outside its blocks (:mod:`.outside`).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..capture.record import bind_to_signature
from ..state import gate_of
from .program import token_mean

#: A feature's source in the block graph: ("out", k) the block's k-th tensor output, ("in", k) its k-th input.
Source = tuple[str, int]


def find_lookaheads(state, calls, raw_calls: dict[int, tuple], order: Sequence[int]) -> dict[int, dict]:
    """``{i: {"block": j, "sources": [...]}}`` for each block ``i`` whose graph can compute the router of the block
    called right after it (``order``: block indices in call order). ``raw_calls[index] = (args, kwargs, output)``
    are the objects of the recorded forward (not copies): identities decide."""
    by_index = {call.index: call for call in calls}
    found = {}
    for previous, following in zip(order, order[1:]):
        router = state.routers.get(following)
        if router is None or previous not in raw_calls or following not in raw_calls:
            continue
        args, kwargs, output = raw_calls[previous]
        call = by_index[previous]
        inputs = call.layout.tensors_of(args, kwargs)
        outputs = call.outputs.tensors_of(output)
        next_args, next_kwargs, _ = raw_calls[following]
        gate = gate_of(by_index[following].block)
        arguments = bind_to_signature(gate.signature, next_args, next_kwargs)
        sources = [source_of(arguments.get(feature.name), inputs, outputs) for feature in router.features]
        if sources and all(s is not None for s in sources):
            found[previous] = {"block": following, "sources": [list(s) for s in sources]}
    return found


def source_of(value, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> Source | None:
    """Where ``value`` is among a graph's inputs or outputs (identity), as a :data:`Source`; None if nowhere."""
    if not isinstance(value, torch.Tensor) or value.is_complex():
        return None
    for k, tensor in enumerate(outputs):
        if tensor is value:
            return ("out", k)
    for k, tensor in enumerate(inputs):
        if tensor is value:
            return ("in", k)
    return None


class LookaheadProgram(nn.Module):
    """``(block inputs, block outputs) -> (B, 1 + K)`` logits of the next block's router (held as ``.router``, so
    its weights are named ``lookahead.router.*`` inside a :class:`~.program.BlockProgram`)."""

    def __init__(self, router: nn.Module, sources: Sequence[Sequence], block: int):
        super().__init__()
        self.router = router
        self.block = int(block)  # the index of the block whose router this is
        self.names = [feature.name for feature in router.features]
        self.sources = [(str(kind), int(k)) for kind, k in sources]

    def forward(self, inputs: Sequence[torch.Tensor], outputs: Sequence[torch.Tensor],
                output_means: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
        """``output_means``: token means of block outputs the graph computes anyway (its summaries), reused."""
        output_means = output_means or {}
        values = []
        for feature, (kind, k) in zip(self.router.features, self.sources):
            value = outputs[k] if kind == "out" else inputs[k]
            if feature.kind == "pooled" and value.ndim > 2:
                # Pooled as the summaries pool (a MatMul, not the router's ReduceMean: 3x faster in ONNX Runtime);
                # the router takes a (B, C) pooled feature as already pooled, so the function is the same.
                value = output_means[k] if kind == "out" and k in output_means else token_mean(value)
            values.append(value)
        return self.router.plain_logits(dict(zip(self.names, values)))

    def signature(self) -> tuple:
        """What two lookaheads must share for one template graph to serve both."""
        router = self.router
        return (repr(router.features), router.fc1.out_features, router.num_widths, router.num_actions,
                tuple(self.sources))


class SegmentWithLookahead(nn.Module):
    """A graph of the model's ops outside its blocks (:mod:`.outside`) that also returns, last, the logits of the
    router of the block called right after it (the first block's router reads the patch embedding and the
    conditioning vector that the first graph computes). Inputs past the segment's first ``segment_inputs`` are
    read by the router only (a model input that the block receives as is, such as the timestep)."""

    def __init__(self, segment: nn.Module, lookahead: LookaheadProgram, segment_inputs: int):
        super().__init__()
        self.segment = segment
        self.lookahead = lookahead
        self.segment_inputs = int(segment_inputs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = tuple(self.segment(*tensors[:self.segment_inputs]))
        return outputs + (self.lookahead(list(tensors), list(outputs)),)

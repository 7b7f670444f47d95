"""What the exporter learns from one real forward of the elastic model: each block's first call (copies of its
arguments and outputs, their layouts), which block parameters code outside the blocks uses, and which block graphs
can also compute the next block's router (:mod:`.lookahead`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..artifact.layout import CallLayout, OutputLayout
from ..capture.record import bind_to_signature, call_model
from ..errors import ExportError
from ..state import force, gate_of, state_of
from .lookahead import LookaheadProgram, find_lookaheads
from .program import pooled_outputs


@dataclass
class RecordedCall:
    """One block's first call in the example forward (dense), with its layouts."""

    index: int
    block: nn.Module
    args: tuple
    kwargs: dict
    output: Any
    batch: int
    layout: CallLayout = field(init=False)
    outputs: OutputLayout = field(init=False)

    order: int = 0  # position of the block's first call in the forward
    raw: tuple | None = None  # (args, kwargs, output) objects of the recorded forward, for identities (lookahead)
    lookahead: Any = None  # .lookahead.LookaheadProgram when this block's graph also runs the next router

    def __post_init__(self):
        self.layout = CallLayout.record(self.args, self.kwargs, self.batch)
        self.outputs = OutputLayout.record(self.output)
        self.tensors = self.layout.tensors_of(self.args, self.kwargs)
        self.pooled = pooled_outputs(self.outputs.tensors_of(self.output), self.batch)


class _OutsideUse(TorchFunctionMode):
    """Records which block parameters are used by torch ops that run outside every block's forward (e.g.
    diffusers' DiT reads ``transformer_blocks[0].norm1.emb`` for its final layer): those must stay in torch."""

    def __init__(self, names_by_id: dict[int, str]):
        super().__init__()
        self.names_by_id = names_by_id
        self.depth = 0
        self.used: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.depth == 0:
            for leaf in pytree.tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.names_by_id:
                    self.used.add(self.names_by_id[id(leaf)])
        return func(*args, **kwargs)


def record_block_calls(model: nn.Module, example_inputs: Any) -> tuple[list[RecordedCall], list[str]]:
    """Run one dense forward (every block runs, full width) and record each block's first call. Also returns
    the names of block parameters that code outside the blocks uses (they stay in PyTorch at run time)."""
    state = state_of(model)
    block_params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)
                    if any(n.startswith(spec.path + ".") for spec in state.specs)}
    watcher = _OutsideUse(block_params)
    seen: dict[int, tuple] = {}
    raw: dict[int, tuple] = {}
    handles = []
    for spec, block in zip(state.specs, state.blocks):
        def pre(module, args, kwargs, index=spec.index):
            watcher.depth += 1
            if index not in seen:
                seen[index] = (pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), (args, dict(kwargs))),)
                raw[index] = (args, dict(kwargs))

        def post(module, args, kwargs, output, index=spec.index):
            watcher.depth -= 1
            if len(seen.get(index, ())) == 1:
                seen[index] = seen[index] + (pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), output),)
                raw[index] = raw[index] + (output,)
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), force(model, skip=False, width=1.0), watcher:
            call_model(model, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    calls = []
    for spec, block in zip(state.specs, state.blocks):
        if len(seen.get(spec.index, ())) != 2:
            raise ExportError(f"block {spec.path} to run in the example forward", "it was not called",
                              "Pass example inputs that run the whole model.")
        (args, kwargs), output = seen[spec.index]
        gate = gate_of(block)
        batch = gate.stream_batch(bind_to_signature(gate.signature, args, kwargs))
        calls.append(RecordedCall(spec.index, block, args, kwargs, output, batch, order=list(raw).index(spec.index),
                                  raw=raw[spec.index]))
    return calls, sorted(watcher.used)


def attach_lookaheads(state, calls: list[RecordedCall]) -> None:
    """Give each block whose graph can compute the next block's router its :class:`LookaheadProgram`."""
    order = [call.index for call in sorted(calls, key=lambda c: c.order)]
    found = find_lookaheads(state, calls, {call.index: call.raw for call in calls}, order)
    for call in calls:
        if call.index in found:
            entry = found[call.index]
            call.lookahead = LookaheadProgram(state.routers[entry["block"]], entry["sources"], entry["block"])

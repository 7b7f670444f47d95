"""Capture the whole model with torch.export, every transformer block kept as one opaque call.

Inside :func:`capture_with_opaque_blocks` each recorded block's ``forward`` (its gate) is replaced by a call of
the custom op ``elastic_compile::opaque_block(tensors, index) -> tensors``: the block's tensor arguments in its
:class:`~elastic_compile.artifact.layout.CallLayout` order in, its tensor outputs in
:class:`~elastic_compile.artifact.layout.OutputLayout` order out. torch.export traces the op with a fake
implementation that returns tensors shaped like the recorded outputs, so the captured graph holds everything
*outside* the blocks as ATen ops and each block call as one node (see :mod:`elastic_compile.export.segments`,
which cuts the graph there).

With ``batch`` given, the capture is batch-polymorphic: every tensor argument of the model call whose leading
dimension is ``batch`` shares one dynamic dimension, and the fake implementation gives each block output that
was batched in the recorded call (leading dimension = the call's batch) the leading dimension of the block's
first batched input, so the symbolic batch flows through the blocks to the outputs.

Guarantee: the blocks' forwards are restored when the capture ends, also when it fails; the op is never run for
real (calling it outside a capture raises).
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..errors import CaptureError
from .record import call_arguments

#: while a capture runs, by block index: the input whose leading dimension is the batch (None: none is) and the
#: (shape, dtype, device, batched) of each tensor output
_OUTPUT_META: dict[int, tuple[int | None, list[tuple[tuple[int, ...], torch.dtype, torch.device, bool]]]] = {}


@torch.library.custom_op("elastic_compile::opaque_block", mutates_args=())
def opaque_block(tensors: list[torch.Tensor], index: int) -> list[torch.Tensor]:
    raise RuntimeError("elastic_compile::opaque_block stands for a block inside a capture; it never runs")


@opaque_block.register_fake
def _opaque_block_fake(tensors, index):
    batch_input, outputs = _OUTPUT_META[index]
    rows = tensors[batch_input].shape[0] if batch_input is not None else None
    return [torch.empty((rows, *shape[1:]) if batched and rows is not None else shape, dtype=dtype, device=device)
            for shape, dtype, device, batched in outputs]


OPAQUE_BLOCK = torch.ops.elastic_compile.opaque_block.default

#: ops torch.export adds to check its own assumptions; they compute nothing a deployed graph needs
_CHECK_OPS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default,
              torch.ops.aten.sym_constrain_range_for_size.default}


@dataclass
class CapturedModel:
    """The model's forward as one graph; ``OPAQUE_BLOCK`` nodes are the block calls (``args[1]``: block index).

    ``example`` is the example call as keyword arguments (:func:`bound_call`; the graph's user inputs are its
    flattened leaves, in ``in_spec`` order, called as ``((), example)``); ``out_spec`` is the output structure.
    """

    graph_module: fx.GraphModule
    example: dict[str, Any]
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec


def bound_call(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """The example call as keyword arguments by parameter name (only those passed, in signature order).
    Raises CaptureError when the call needs ``*args`` / ``**kwargs`` (no stable names to key a graph on)."""
    args, kwargs = call_arguments(example_inputs)
    signature = inspect.signature(model.forward)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise CaptureError("example inputs that the model's forward signature accepts", str(exc),
                           "Pass the inputs the way the pipeline calls the model.") from exc
    for name in bound.arguments:
        if signature.parameters[name].kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise CaptureError("a forward call with named parameters only", f"values for *{name}/**{name}",
                               "Call the model with its named parameters.")
    return dict(bound.arguments)


@contextlib.contextmanager
def _blocks_as_opaque_calls(calls: Sequence):
    """Every recorded block's forward becomes one ``OPAQUE_BLOCK`` call (see the module docstring)."""
    saved = {}
    try:
        for call in calls:
            outputs = call.outputs.tensors_of(call.output)
            batch_input = next((k for k, leaf in enumerate(call.layout.inputs) if leaf.batched), None)
            _OUTPUT_META[call.index] = (batch_input, [
                (tuple(t.shape), t.dtype, t.device, t.ndim > 0 and int(t.shape[0]) == call.batch) for t in outputs])

            def forward(*args, _call=call, **kwargs):
                tensors = _call.layout.tensors_of(args, kwargs)
                results = OPAQUE_BLOCK(list(tensors), _call.index)
                return _call.outputs.pack(list(results))
            saved[call.index] = (call.block, call.block.__dict__.get("forward"))
            call.block.forward = forward
        yield
    finally:
        for block, forward in saved.values():
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
        for index in saved:
            _OUTPUT_META.pop(index, None)


def batch_dynamic_shapes(kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
    """torch.export ``dynamic_shapes`` for a keyword call: dimension 0 of every tensor leaf with ``batch`` rows
    is one shared dimension named ``batch``; every other leaf is static."""
    dim = torch.export.Dim("batch")

    def spec(value):
        batched = isinstance(value, torch.Tensor) and value.ndim > 0 and int(value.shape[0]) == batch
        return {0: dim} if batched else None
    return {name: pytree.tree_map(spec, value) for name, value in kwargs.items()}


def capture_with_opaque_blocks(model: nn.Module, example_inputs: Any, calls: Sequence,
                               batch: int | None = None) -> CapturedModel:
    """torch.export ``model`` on the example call (keyword form, see :func:`bound_call`) with each block of
    ``calls`` (:class:`~elastic_compile.export.recording.RecordedCall`) opaque; torch.export's own checks removed.
    ``batch``: capture with a dynamic batch dimension (module docstring; the example must have ``batch`` >= 2
    rows). Raises CaptureError with the exporter's message."""
    kwargs = bound_call(model, example_inputs)
    dynamic = batch_dynamic_shapes(kwargs, batch) if batch is not None else None
    try:
        with _blocks_as_opaque_calls(calls), torch.no_grad():
            program = torch.export.export(model, (), kwargs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        raise CaptureError("a model forward that torch.export can capture with its blocks opaque",
                           f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                           "Report the model; its blocks still export and run one by one.") from exc
    graph_module = program.module()
    graph = graph_module.graph
    for node in list(reversed(graph.nodes)):
        checks = node.op == "call_function" and node.target in _CHECK_OPS
        guards = node.op == "call_module" and str(node.target).startswith("_guards")
        if (checks or guards) and not node.users:
            graph.erase_node(node)
    graph.eliminate_dead_code()  # the size arithmetic only those checks read
    graph.lint()
    graph_module.recompile()
    return CapturedModel(graph_module, kwargs, program.call_spec.in_spec, program.call_spec.out_spec)

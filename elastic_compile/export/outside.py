"""Export the parts of the model outside its blocks as ONNX graphs, and the forward as a program of steps.

The whole model is captured once with its blocks opaque (:mod:`elastic_compile.capture.opaque_blocks`) and cut
at the block calls (:mod:`.segments`). Each segment becomes ``outside/part_<k>.onnx`` (its weights, e.g. the
patch embedding, timestep MLP and final projection, inline or in ``part_<k>.onnx.data`` next to it), verified
against PyTorch on the values of the example forward; the manifest's ``program`` entry lists the steps, which
:class:`elastic_compile.serve.driver.ModelDriver` runs in place of the model's Python forward.

Batch: the capture is batch-polymorphic where the model allows it (every model input with the example's batch
rows shares one dynamic dimension, see :mod:`elastic_compile.capture.opaque_blocks`), so one set of graphs
serves every batch size, e.g. both classifier-free-guidance layouts; the manifest's call leaves then say
``"batch"`` for that dimension and ``program.batch`` lists the batch sizes the graphs were checked at. A model
whose forward specialises on its batch size (or whose dynamic graphs do not reproduce it at those sizes) gets
the example's static shapes instead, and ``program.batch.note`` says why.

Router lookahead: a graph followed directly by a block call whose router reads only that graph's inputs or
outputs (as the first block's router reads the patch embedding and the conditioning vector) also returns that
router's logits, last (:class:`~.lookahead.SegmentWithLookahead`; the step's ``lookahead`` entry says for which
block and from which values), as block graphs do for the next block (:mod:`.lookahead`).

Guarantee: before anything is written, the program is run in PyTorch (segments as graph modules, blocks as the
elastic model's own blocks at full width) and must reproduce the model's output; every written graph must match
its segment within the export's tolerance; dynamic graphs, run whole in ONNX Runtime with the blocks in
PyTorch, must reproduce the model at batch 1, the example's batch and one more. A model whose forward cannot be
captured this way (data-dependent Python control flow, non-tensor values between the parts, an output structure
that cannot be serialised) gets no program: :func:`export_outside` raises
:class:`~elastic_compile.errors.ExportError`, the exporter records why, and the runtime then runs those parts in
PyTorch as before.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from torch.utils import _pytree as pytree

from ..artifact.graphs import BlockCalls, attribute_at, graph_inputs, run_graph_step, run_steps
from ..artifact.layout import cycle_rows, dtype_name
from ..artifact.tolerance import ATOL, max_abs_diff, within
from ..backends.onnxruntime import OrtGraph
from ..capture.opaque_blocks import bound_call, capture_with_opaque_blocks
from ..capture.record import bind_to_signature, call_model
from ..errors import CaptureError, ExportError
from ..state import force, gate_of, state_of
from .lookahead import LookaheadProgram, SegmentWithLookahead, source_of
from .onnx_io import check_file, complex_outputs_of, export_graph
from .passes import drop_noop_squeeze_dims
from .segments import Segment, split_at_blocks

#: graph initializers above this many bytes go to a ``.data`` file next to the graph
EXTERNAL_DATA_BYTES = 1024


def symbolic_dims(node) -> list[int]:
    """The dimensions of a captured value whose size is symbolic (the batch, or an expression of it)."""
    value = node.meta.get("val")
    return [d for d, size in enumerate(value.shape) if not isinstance(size, int)] if isinstance(value, torch.Tensor) else []


def _leaf_entry(value: Any, name: str | None, node) -> dict:
    if isinstance(value, torch.Tensor):
        dynamic = symbolic_dims(node)
        if dynamic not in ([], [0]):
            raise ExportError("model inputs whose only dynamic dimension is the batch", f"dimensions {dynamic}",
                              "Report the model.")
        shape = ["batch" if d in dynamic else size for d, size in enumerate(value.shape)]
        return {"kind": "tensor", "value": name, "shape": shape, "dtype": dtype_name(value.dtype)}
    if not isinstance(value, (bool, int, float, str, type(None))):
        raise ExportError("model call arguments made of tensors and plain constants", f"a {type(value).__name__}",
                          "Those parts stay in PyTorch for this model.")
    return {"kind": "const", "value": value}


def _treespec(spec, what: str) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except Exception as exc:
        raise ExportError(f"a serialisable {what} structure", f"{type(exc).__name__}: {exc}",
                          "Call the model so that it returns tuples/tensors (e.g. return_dict=False).") from exc


def export_outside(model: torch.nn.Module, example_inputs: Any, calls: Sequence, root: Path,
                   threads: int | None = None, lookaheads: bool = False) -> dict:
    """Write ``outside/`` under ``root`` and return the manifest's ``program`` entry (module docstring): with a
    dynamic batch dimension when the model captures that way and the graphs reproduce it at every verified
    batch size, else with the example's static shapes (``batch.note`` says why). ``lookaheads``: graphs
    followed by a routed block also compute its router's logits where they can."""
    batch = max(call.batch for call in calls)
    try:
        return _export_program(model, example_inputs, calls, root, threads, batch, lookaheads)
    except Exception as exc:  # the static program is still worth having
        shutil.rmtree(root / "outside", ignore_errors=True)
        entry = _export_program(model, example_inputs, calls, root, threads, None, lookaheads)
        note = str(exc) if isinstance(exc, ExportError) else f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        entry["batch"] = {"dynamic": False, "note": note}
        return entry


def resize_batch(kwargs: dict[str, Any], batch: int, rows: int) -> dict[str, Any]:
    """The keyword call with ``rows`` samples: every tensor leaf with ``batch`` rows (the batch rule of
    :mod:`elastic_compile.artifact.layout`) takes rows ``0..rows-1`` of itself cyclically; other leaves are kept."""
    def resize(value):
        batched = isinstance(value, torch.Tensor) and value.ndim > 0 and int(value.shape[0]) == batch
        return cycle_rows(value, rows) if batched else value
    return {name: pytree.tree_map(resize, value) for name, value in kwargs.items()}


def _export_program(model, example_inputs, calls, root: Path, threads, batch: int | None,
                    lookaheads: bool = False) -> dict:
    """The ``program`` entry; ``batch`` None: static shapes, else dynamic over the example's ``batch`` rows."""
    kwargs = bound_call(model, example_inputs)
    rows = None
    if batch is not None:  # torch.export specialises a dimension of size 1: capture two rows at least
        rows = max(batch, 2)
        kwargs = resize_batch(kwargs, batch, rows)
    try:
        captured = capture_with_opaque_blocks(model, kwargs, calls, batch=rows)
    except CaptureError as exc:
        raise ExportError("a forward that torch.export captures with its blocks opaque", str(exc),
                          "Those parts stay in PyTorch for this model.") from exc
    program = split_at_blocks(captured)
    leaves, spec = pytree.tree_flatten(((), kwargs))
    if spec != captured.in_spec or len(leaves) != len(program.inputs):
        raise ExportError("one graph input per leaf of the model call", f"{len(program.inputs)} vs {len(leaves)}",
                          "Those parts stay in PyTorch for this model.")
    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    call_entry = {"names": list(kwargs), "spec": _treespec(captured.in_spec, "call"),
                  "leaves": [_leaf_entry(v, n, node) for v, n, node in zip(leaves, program.inputs, placeholders)]}
    outputs_entry = {"spec": _treespec(captured.out_spec, "output"), "values": program.outputs,
                     "constants": {str(k): v for k, v in program.output_constants.items()}}

    # The program in PyTorch: every segment's example inputs and expected outputs, and the split checked whole.
    steps = program.torch_steps()
    blocks = BlockCalls({c.index: c.block for c in calls}, {c.index: (c.layout, c.outputs) for c in calls})
    seen: dict[int, tuple[list, list]] = {}

    def torch_graph(step, tensors):
        outputs = list(step["segment"].module(*tensors))
        seen[id(step)] = (tensors, outputs)
        return outputs

    def torch_block(step, tensors):
        seen[id(step)] = (tensors, None)
        return blocks(step, tensors)
    _check_program(model, program, steps, kwargs, torch_graph, torch_block, "the program of graphs and block calls")

    entries, worst, sessions, lookahead_of = [], 0.0, {}, {}
    for k, step in enumerate(steps):
        if "segment" not in step:
            entries.append({"block": step["block"], "inputs": step["inputs"], "outputs": step["outputs"]})
            continue
        tensors, outputs = seen[id(step)]
        relative = f"outside/part_{k:02d}.onnx"
        following = steps[k + 1] if k + 1 < len(steps) else {}
        found = (_segment_lookahead(model, calls, tensors, outputs, following, seen)
                 if lookaheads and "block" in following else None)
        lookahead, extra = found if found is not None else (None, [])
        if extra:  # values the router reads that the graph did not take (model inputs passed to the block)
            step["inputs"] = list(step["inputs"]) + [name for name, _ in extra]
        session, diff, complex_inputs, complex_outputs = _write_segment(
            step["segment"], tensors, outputs, root / relative, threads, lookahead,
            [value for _, value in extra], rows)
        worst = max(worst, diff)
        entries.append({"graph": relative, "inputs": step["inputs"], "outputs": step["outputs"],
                        "ops": step["segment"].compute_ops(), "max_abs_diff": diff})
        if lookahead is not None:
            entries[-1]["lookahead"] = {"block": lookahead.block, "sources": [list(s) for s in lookahead.sources]}
            lookahead_of[id(step)] = lookahead
        if complex_inputs or complex_outputs:  # carried as view_as_real pairs (passes/complex_to_real.py)
            entries[-1].update(complex_inputs=complex_inputs, complex_outputs=complex_outputs)
        sessions[id(step)] = (session, entries[-1])
    entry = {"call": call_entry, "steps": entries, "outputs": outputs_entry, "parameters": program.parameters,
             "max_abs_diff": worst, "dtype": "fp32", "batch": {"dynamic": False}}
    if rows is not None:
        # The graphs take any batch: check them, whole, at sizes they were not captured at (1 included: a
        # dimension torch.export assumed >= 2 while tracing).
        def ort_graph(step, tensors):
            session, written = sessions[id(step)]
            outputs = run_graph_step(session, written, tensors)
            if id(step) not in lookahead_of:
                return outputs
            with torch.no_grad():  # the router's logits at this batch size too
                expected = lookahead_of[id(step)](list(tensors), list(outputs[:-1]))
            diff, scale = max_abs_diff([outputs[-1]], [expected])
            if not within(diff, scale, "fp32"):
                raise ExportError(f"{written['graph']}'s router logits to match PyTorch at batch {len(expected)}",
                                  f"max |diff| {diff:.3g}", "Report the model; export with router_summaries=False.")
            return outputs[:-1]
        verified = sorted({1, batch, rows, rows + 1})
        for size in verified:
            if size != rows:
                _check_program(model, program, steps, resize_batch(kwargs, rows, size), ort_graph, blocks,
                               f"the outside graphs at batch {size}")
        entry["batch"] = {"dynamic": True, "verified": verified}
    return entry


def _check_program(model, program, steps, kwargs: dict, run_graph, blocks, what: str) -> None:
    """Run ``steps`` on the keyword call (blocks dense) and compare with the model's own output (fp32
    tolerance); raise ExportError when they differ."""
    leaves = pytree.tree_leaves(((), kwargs))
    env = {n: v for n, v in zip(program.inputs, leaves) if n is not None}
    env.update({name: attribute_at(program.captured.graph_module, path) for name, path in program.parameters.items()})
    with torch.no_grad(), force(model, skip=False, width=1.0):
        env = run_steps(steps, env, run_graph, blocks)
        expected = [t for t in pytree.tree_leaves(call_model(model, kwargs)) if isinstance(t, torch.Tensor)]
    got = [env[name] if name is not None else program.output_constants[k] for k, name in enumerate(program.outputs)]
    got = pytree.tree_leaves(pytree.tree_unflatten(got, program.captured.out_spec))
    diff, scale = max_abs_diff([t for t in got if isinstance(t, torch.Tensor)], expected)
    if not within(diff, scale, "fp32"):
        raise ExportError(f"{what} to reproduce the model", f"max |diff| {diff:.3g}",
                          "Report the model; its parts outside the blocks stay in PyTorch.")


def _segment_lookahead(model, calls: Sequence, tensors: list, outputs: list, following: dict,
                       seen: dict) -> tuple[LookaheadProgram, list[tuple[str, torch.Tensor]]] | None:
    """The router of the block step ``following`` as a function of this graph's ``tensors`` / ``outputs`` (by
    identity: the values of the checked PyTorch run) and of ``extra`` inputs: ``[(program value name, tensor)]``
    that the block receives from elsewhere (a model input such as the timestep, passed to the block as is), which
    the graph then takes after its own. None when the block has no router or it reads a non-tensor."""
    index = following["block"]
    router = state_of(model).routers.get(index)
    call = next((c for c in calls if c.index == index), None)
    if router is None or call is None or id(following) not in seen:
        return None
    block_tensors = seen[id(following)][0]
    args, kwargs = call.layout.rebuild(block_tensors)
    arguments = bind_to_signature(gate_of(call.block).signature, args, kwargs)
    sources, extra = [], []
    for feature in router.features:
        value = arguments.get(feature.name)
        source = source_of(value, list(tensors) + [t for _, t in extra], outputs)
        if source is None and isinstance(value, torch.Tensor) and not value.is_complex():
            position = next((m for m, t in enumerate(block_tensors) if t is value), None)
            if position is not None:
                extra.append((following["inputs"][position], value))
                source = ("in", len(tensors) + len(extra) - 1)
        sources.append(source)
    if not sources or any(s is None for s in sources):
        return None
    return LookaheadProgram(router, sources, index), extra


def _write_segment(segment: Segment, tensors: list, expected: list, path: Path, threads,
                   lookahead: LookaheadProgram | None = None, extra: Sequence[torch.Tensor] = (),
                   batch_rows: int | None = None) -> tuple[OrtGraph, float, list[int], list[int]]:
    """Export, save and check one part; ``(its ONNX Runtime session, max |diff|, complex inputs, complex
    outputs)`` (the complex values it takes and returns as ``view_as_real`` pairs). With a ``lookahead``, the
    graph also takes ``extra`` inputs after the segment's (batch-dynamic where the program is, ``batch_rows``
    rows) and returns the router's logits last, checked against the router in PyTorch."""
    what = f"the model's ops outside its blocks ({path.stem})"
    drop_noop_squeeze_dims(segment.module)
    dynamic = [symbolic_dims(node) for node in segment.module.graph.nodes if node.op == "placeholder"]
    module = segment.module
    if lookahead is not None:
        module = SegmentWithLookahead(segment.module, lookahead, len(tensors))
        tensors = list(tensors) + list(extra)
        dynamic += [[0] if batch_rows is not None and t.ndim > 0 and t.shape[0] == batch_rows else [] for t in extra]
        with torch.no_grad():
            expected = list(expected) + [lookahead(tensors, list(expected))]
    proto, complex_inputs = export_graph(module, tensors, what, weight_prefixes=(), dynamic_dims=dynamic,
                                         complex_outputs=True)
    complex_outputs = complex_outputs_of(proto)
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(len(init.raw_data) for init in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=EXTERNAL_DATA_BYTES)
    check_file(path)
    session = OrtGraph(path, threads)
    got = session(graph_inputs(tensors, torch.float32, complex_inputs))
    diff, scale = max_abs_diff(got, [torch.view_as_real(t.resolve_conj()) if t.is_complex() else t for t in expected])
    if not within(diff, scale, "fp32"):
        raise ExportError(f"{path.name} to match PyTorch within {ATOL['fp32']} x max(1, |ref|)",
                          f"max |diff| {diff:.3g}", "Report the model; its parts outside the blocks stay in PyTorch.")
    return session, diff, complex_inputs, complex_outputs

"""Export the parts of the model outside its blocks as ONNX graphs, and the forward as a program of steps.

The whole model is captured once with its blocks opaque (:mod:`elastic_compile.capture.opaque_blocks`) and cut
at the block calls (:mod:`.segments`). Each segment becomes ``outside/part_<k>.onnx`` (its weights, e.g. the
patch embedding, timestep MLP and final projection, inline or in ``part_<k>.onnx.data`` next to it), verified
against PyTorch on the values of the example forward; the manifest's ``program`` entry lists the steps, which
:class:`elastic_compile.runtime.driver.ModelDriver` runs in place of the model's Python forward.

Guarantee: before anything is written, the program is run in PyTorch (segments as graph modules, blocks as the
elastic model's own blocks at full width) and must reproduce the model's output; every written graph must match
its segment within the export's tolerance. A model whose forward cannot be captured this way (data-dependent
Python control flow, non-tensor values between the parts, an output structure that cannot be serialised) gets
no program: :func:`export_outside` raises :class:`~elastic_compile.errors.ExportError` and the exporter records
why, and the runtime then runs those parts in PyTorch as before.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from torch.utils import _pytree as pytree

from ..capture.opaque_blocks import capture_with_opaque_blocks
from ..capture.record import call_model
from ..errors import CaptureError, ExportError
from ..runtime.driver import BlockCalls, run_steps
from ..runtime.state import force
from .layout import dtype_name
from .onnx_io import check_file, export_graph
from .passes import drop_noop_squeeze_dims
from .segments import Segment, attribute_at, split_at_blocks
from .verify import ATOL, max_abs_diff, run_ort, within

#: graph initializers above this many bytes go to a ``.data`` file next to the graph
EXTERNAL_DATA_BYTES = 1024


def _leaf_entry(value: Any, name: str | None) -> dict:
    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "value": name, "shape": list(value.shape), "dtype": dtype_name(value.dtype)}
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
                   threads: int | None = None) -> dict:
    """Write ``outside/`` under ``root`` and return the manifest's ``program`` entry (module docstring)."""
    try:
        captured = capture_with_opaque_blocks(model, example_inputs, calls)
    except CaptureError as exc:
        raise ExportError("a forward that torch.export captures with its blocks opaque", str(exc),
                          "Those parts stay in PyTorch for this model.") from exc
    program = split_at_blocks(captured)
    kwargs = captured.example
    leaves, spec = pytree.tree_flatten(((), kwargs))
    if spec != captured.in_spec or len(leaves) != len(program.inputs):
        raise ExportError("one graph input per leaf of the model call", f"{len(program.inputs)} vs {len(leaves)}",
                          "Those parts stay in PyTorch for this model.")
    call_entry = {"names": list(kwargs), "spec": _treespec(captured.in_spec, "call"),
                  "leaves": [_leaf_entry(v, n) for v, n in zip(leaves, program.inputs)]}
    outputs_entry = {"spec": _treespec(captured.out_spec, "output"), "values": program.outputs,
                     "constants": {str(k): v for k, v in program.output_constants.items()}}

    # The program in PyTorch: every segment's example inputs and expected outputs, and the split checked whole.
    steps = program.torch_steps()
    blocks = BlockCalls({c.index: c.block for c in calls}, {c.index: (c.layout, c.outputs) for c in calls})
    env = {n: v for n, v in zip(program.inputs, leaves) if n is not None}
    env.update({name: attribute_at(captured.graph_module, path) for name, path in program.parameters.items()})
    seen: dict[int, tuple[list, list]] = {}

    def torch_graph(step, tensors):
        outputs = list(step["segment"].module(*tensors))
        seen[id(step)] = (tensors, outputs)
        return outputs
    with torch.no_grad(), force(model, skip=False, width=1.0):
        env = run_steps(steps, env, torch_graph, blocks)
        expected = [t for t in pytree.tree_leaves(call_model(model, example_inputs)) if isinstance(t, torch.Tensor)]
    got = [env[name] if name is not None else program.output_constants[k] for k, name in enumerate(program.outputs)]
    got = [t for t in pytree.tree_leaves(pytree.tree_unflatten(got, captured.out_spec)) if isinstance(t, torch.Tensor)]
    diff, scale = max_abs_diff(got, expected)
    if not within(diff, scale, "fp32"):
        raise ExportError("the program of graphs and block calls to reproduce the model", f"max |diff| {diff:.3g}",
                          "Report the model; its parts outside the blocks stay in PyTorch.")

    entries, worst = [], 0.0
    for k, step in enumerate(steps):
        if "segment" not in step:
            entries.append({"block": step["block"], "inputs": step["inputs"], "outputs": step["outputs"]})
            continue
        tensors, outputs = seen[id(step)]
        relative = f"outside/part_{k:02d}.onnx"
        diff = _write_segment(step["segment"], tensors, outputs, root / relative, threads)
        worst = max(worst, diff)
        entries.append({"graph": relative, "inputs": step["inputs"], "outputs": step["outputs"],
                        "ops": step["segment"].compute_ops(), "max_abs_diff": diff})
    return {"call": call_entry, "steps": entries, "outputs": outputs_entry, "parameters": program.parameters,
            "max_abs_diff": worst, "dtype": "fp32"}


def _write_segment(segment: Segment, tensors: list, expected: list, path: Path, threads) -> float:
    what = f"the model's ops outside its blocks ({path.stem})"
    drop_noop_squeeze_dims(segment.module)
    proto, complex_inputs = export_graph(segment.module, tensors, what, weight_prefixes=())
    if complex_inputs:
        raise ExportError(f"real-valued inputs for {path.name}", "complex tensors between the parts",
                          "Those parts stay in PyTorch for this model.")
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(len(init.raw_data) for init in proto.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(proto, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=f"{path.name}.data", size_threshold=EXTERNAL_DATA_BYTES)
    check_file(path)
    got = run_ort(path, tensors, torch.float32, [], threads)
    diff, scale = max_abs_diff(got, expected)
    if not within(diff, scale, "fp32"):
        raise ExportError(f"{path.name} to match PyTorch within {ATOL['fp32']} x max(1, |ref|)",
                          f"max |diff| {diff:.3g}", "Report the model; its parts outside the blocks stay in PyTorch.")
    return diff

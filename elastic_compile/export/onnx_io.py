"""torch -> ONNX for one program, and per-block weights kept once in a shared external-data file.

Graphs are exported with ``torch.onnx.export(..., dynamo=True, optimize=False)`` from a ``torch.export`` program
(complex arithmetic lowered first, see :mod:`.passes.complex_to_real`). Without the exporter's optimizer every
parameter stays a named initializer (``block.<parameter path>``) used by explicit ops (e.g. ``Transpose``;
onnxruntime and TensorRT fold those at load time), which makes two things possible:

* the blocks of one group (same class, same call layout) share one *template* graph per (bucket, batch size):
  each block's file is the template with its initializers pointing at that block's weights;
* every graph of a block (all buckets, all batch sizes) references the same weights file through ONNX external
  data (``location``/``offset``/``length``), so weights are stored once per block, not once per graph.

Guarantee: a file written by :func:`write_block_graph` is a complete ONNX model (``onnx.checker`` full check
passes, onnxruntime and TensorRT's parser load it from its path); whether it computes the block is checked
separately by comparing it with PyTorch (:mod:`.verify`).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import onnx
import torch

from ..artifact.validate import OPSET  # the opset of the format: what runtimes of this version accept
from ..errors import ExportError
from .passes.complex_to_real import export_without_complex
from .passes.fold_constants import fold_constants

ALIGNMENT = 64

_ONNX_TYPE = {torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
              torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
              torch.int64: onnx.TensorProto.INT64, torch.int32: onnx.TensorProto.INT32,
              torch.bool: onnx.TensorProto.BOOL, torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8}


@contextlib.contextmanager
def _quiet_exporter():
    names = ["torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir"]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@functools.lru_cache(maxsize=4)
def _registry(opset: int):
    from torch.onnx._internal.exporter import _registration
    return _registration.ONNXRegistry().from_torchlib(opset_version=opset)


def _to_onnx(program: torch.export.ExportedProgram, opset: int, names: dict):
    """``torch.onnx.export(program, dynamo=True, optimize=False)``. Building the exporter's op registry takes
    ~1 s per call, so it is built once per opset and passed to the exporter's core (private API of torch
    2.6-2.13; falls back to the public call if that moves)."""
    with warnings.catch_warnings():
        # torch's exporter deep-copies the program, whose TreeSpecs warn per leaf (deprecated LeafSpec, torch 2.13):
        # torch's own objects, nothing a user of this toolkit can act on.
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        try:
            from torch.onnx._internal.exporter import _core
            registry = _registry(opset)
        except (ImportError, AttributeError, TypeError):
            return torch.onnx.export(program, (), dynamo=True, opset_version=opset, optimize=False, verbose=False,
                                     **names)
        return _core.export(program, registry=registry, opset_version=opset, optimize=False, verbose=False, **names)


#: model-level ONNX metadata: comma-separated indices of outputs that are ``view_as_real`` pairs of complex values
COMPLEX_OUTPUTS_KEY = "elastic_compile.complex_outputs"


def complex_outputs_of(model: onnx.ModelProto) -> list[int]:
    """The outputs :func:`export_graph` wrote as ``view_as_real`` pairs (``complex_outputs=True``)."""
    for prop in model.metadata_props:
        if prop.key == COMPLEX_OUTPUTS_KEY:
            return [int(k) for k in prop.value.split(",") if k]
    return []


def export_graph(module: torch.nn.Module, example: Sequence[torch.Tensor], what: str,
                 dynamic_batch: bool = False, opset: int = OPSET, dynamic_dims: Sequence[Sequence[int]] | None = None,
                 complex_outputs: bool = False,
                 weight_prefixes: tuple[str, ...] = ("block.", "router.", "lookahead.")) -> tuple[onnx.ModelProto, list[int]]:
    """ONNX model of ``module(*example)`` with inputs ``in_<k>`` and outputs ``out_<k>``.

    Returns ``(model, complex_inputs)``: indices of inputs that were complex and now take
    ``torch.view_as_real`` of the tensor. ``dynamic_batch`` makes dim 0 of every input dynamic;
    ``dynamic_dims[k]`` (instead) lists the dynamic dimensions of input ``k``. ``complex_outputs``: complex
    outputs become ``view_as_real`` pairs, listed by :func:`complex_outputs_of` (else they are an error).
    """
    example = tuple(example)
    if dynamic_batch:
        dynamic_dims = [[0]] * len(example)
    try:
        dynamic = per_input = None
        if dynamic_dims is not None and any(dynamic_dims):
            dynamic = per_input = tuple({d: torch.export.Dim.DYNAMIC for d in dims} or None for dims in dynamic_dims)
            parameters = list(inspect.signature(module.forward).parameters.values())
            if len(parameters) == 1 and parameters[0].kind is inspect.Parameter.VAR_POSITIONAL:
                dynamic = (dynamic,)  # forward(*tensors): one spec, for the tuple
        with torch.no_grad(), _quiet_exporter():
            program = torch.export.export(module, example, dynamic_shapes=dynamic, strict=False)
            # re-exported from program.module(), whose forward takes the inputs one by one: the per-input specs
            program, complex_inputs, paired = export_without_complex(program, list(example), complex_outputs,
                                                                     per_input)
            count = len(program.graph_signature.user_outputs)
            names = dict(input_names=[f"in_{k}" for k in range(len(example))],
                         output_names=[f"out_{k}" for k in range(count)])
            onnx_program = _to_onnx(program, opset, names)
            model = fold_constants(onnx_program.model_proto, weight_prefixes)
            if paired:
                model.metadata_props.add(key=COMPLEX_OUTPUTS_KEY, value=",".join(map(str, paired)))
        return _strip_debug_info(model), complex_inputs
    except ExportError:
        raise
    except Exception as exc:
        raise ExportError(f"{what} to export to ONNX (torch.export + torch.onnx.export, dynamo)",
                          f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                          "Report the model; rewrite passes live in elastic_compile/export/passes/.") from exc


def _strip_debug_info(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop per-node exporter metadata (Python stack traces, module paths: most of a graph file once its weights
    are external). Does not change what the graph computes."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    return model


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().contiguous().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    return tensor.numpy().tobytes()


class WeightFile:
    """One block's weights, appended once each and referenced by all of the block's graphs."""

    def __init__(self, path: Path):
        self.path = path
        self.offsets: dict[str, tuple[int, int]] = {}
        self.size = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")

    def reference(self, name: str, tensor: torch.Tensor) -> tuple[int, int]:
        """``(offset, length)`` of ``tensor`` in the file, appending it the first time ``name`` is seen."""
        if name not in self.offsets:
            data = tensor_bytes(tensor)
            padding = (-self.size) % ALIGNMENT
            with open(self.path, "ab") as handle:
                handle.write(b"\0" * padding + data)
            self.offsets[name] = (self.size + padding, len(data))
            self.size += padding + len(data)
        return self.offsets[name]


def block_tensors(block: torch.nn.Module, prefix: str = "block.") -> dict[str, torch.Tensor]:
    """Parameters and buffers of ``block`` named as in a program that holds it as ``.block``."""
    named = {f"{prefix}{n}": p for n, p in block.named_parameters(remove_duplicate=False)}
    named.update({f"{prefix}{n}": b for n, b in block.named_buffers(remove_duplicate=False)})
    return named


def write_block_graph(template: onnx.ModelProto, tensors: dict[str, torch.Tensor], weights: WeightFile | None,
                      path: Path, float_dtype: torch.dtype = torch.float32) -> int:
    """Write ``template`` to ``path`` with the values of ``tensors`` in place of the initializers of the same
    name (same shape, and the same type once floating tensors are cast to ``float_dtype``): stored in
    ``weights`` (external data) when given, else inline. Returns how many initializers were replaced."""
    model = onnx.ModelProto()
    model.CopyFrom(template)
    location = os.path.relpath(weights.path, path.parent) if weights is not None else None
    replaced = 0
    for init in model.graph.initializer:
        tensor = tensors.get(init.name)
        if tensor is None:
            continue
        dtype = float_dtype if tensor.is_floating_point() else tensor.dtype
        if list(init.dims) != list(tensor.shape) or _ONNX_TYPE.get(dtype) != init.data_type:
            continue
        for attribute in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data",
                          "string_data"):
            init.ClearField(attribute)
        if weights is None:
            init.raw_data = tensor_bytes(tensor.detach().to(dtype))
        else:
            offset, length = weights.reference(init.name, tensor.detach().to(dtype))
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                entry = init.external_data.add()
                entry.key, entry.value = key, value
        replaced += 1
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return replaced


def check_file(path: Path) -> None:
    """``onnx.checker.check_model(path, full_check=True)``; ExportError when it fails."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"{path.name} to pass onnx.checker (full check)", f"{type(exc).__name__}: {exc}",
                          "Report the model.") from exc



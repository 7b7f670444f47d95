"""``elastic_compile.export``: write a deployable artifact and, before it replaces the output directory, load it
back with the runtime and compare it with the PyTorch model.

The writer (:mod:`elastic_compile.export`) and the reader (:mod:`elastic_compile.serve`) share only the format
(:mod:`elastic_compile.artifact`); this module is where the two meet.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch import nn

from .export.exporter import export as write_artifact
from .serve.check import check_runtime


def export(model: nn.Module, example_inputs: Any, out_dir, buckets: Sequence[float] | None = None,
           dtype: str = "fp32", backend: str = "onnxruntime", batch_sizes: Sequence[int] | None = None, *,
           verify_runtime: bool = True, **options) -> Path:
    """Export an elastic model (from ``transform`` or ``load``) to ``out_dir``; see
    :func:`elastic_compile.export.exporter.export` for the options. ``verify_runtime``: also load the staged
    artifact with the runtime (ONNX Runtime; TensorRT where its engines were built) and compare whole-model
    outputs with ``model`` under several forced plans before committing it."""
    return write_artifact(model, example_inputs, out_dir, buckets, dtype, backend, batch_sizes,
                          runtime_check=check_runtime if verify_runtime else None, **options)

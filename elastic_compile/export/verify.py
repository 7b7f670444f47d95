"""Load what was exported and compare it with PyTorch ("always load and compare what you export").

Every block graph and router graph is run in onnxruntime (CPU) on the block's real recorded inputs, resized to
the graph's batch size, and compared with the PyTorch elastic model's own computation of that block at that
bucket in float32, within the tolerances of :mod:`elastic_compile.artifact.tolerance`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..artifact.graphs import graph_inputs
from ..artifact.tolerance import max_abs_diff
from ..backends.onnxruntime import OrtGraph

#: Export dtypes onnxruntime's CPU provider can run (fp16 graphs run there through inserted casts: slow, but
#: correct; it has no bfloat16 kernels for most ops, so bf16 graphs are for TensorRT only).
ORT_CPU_DTYPES = ("fp32", "fp16")


def run_ort(path: Path, inputs: Sequence[torch.Tensor], dtype: torch.dtype, complex_inputs, threads=None) -> list:
    return OrtGraph(path, threads)(graph_inputs(inputs, dtype, complex_inputs))


def compare_block_file(path: Path, program: torch.nn.Module, inputs: Sequence[torch.Tensor], dtype: str,
                       torch_dtype: torch.dtype, complex_inputs, threads=None) -> tuple[float, float]:
    """Run the graph at ``path`` and ``program`` (float32 PyTorch) on ``inputs``; ``(max diff, scale)``."""
    with torch.no_grad():
        expected = list(program(*inputs))
    got = run_ort(path, inputs, torch_dtype, complex_inputs, threads)
    return max_abs_diff(got, expected)

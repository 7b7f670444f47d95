"""Load what was exported and compare it with PyTorch ("always load and compare what you export").

Every block graph and router graph is run in onnxruntime (CPU) on the block's real recorded inputs, resized to
the graph's batch size, and compared with the PyTorch elastic model's own computation of that block at that
bucket in float32. Tolerances are absolute, scaled by the reference's magnitude: ``atol * max(1, max|ref|)``
with atol 1e-4 (fp32), 2e-2 (fp16), 1e-1 (bf16).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..runtime.backends.onnxruntime import OrtGraph
from .program import graph_inputs

ATOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}

#: Export dtypes onnxruntime's CPU provider can run (fp16 graphs run there through inserted casts: slow, but
#: correct; it has no bfloat16 kernels for most ops, so bf16 graphs are for TensorRT only).
ORT_CPU_DTYPES = ("fp32", "fp16")


def max_abs_diff(got: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(max |got - expected|, max |expected|)`` over all outputs (float64 arithmetic)."""
    if len(got) != len(expected):
        return float("inf"), 1.0
    diff, scale = 0.0, 0.0
    for g, e in zip(got, expected):
        if tuple(g.shape) != tuple(e.shape):
            return float("inf"), 1.0
        if e.numel():
            g, e = g.detach().cpu().double(), e.detach().cpu().double()
            diff = max(diff, float((g - e).abs().max()))
            scale = max(scale, float(e.abs().max()))
    return diff, scale


def within(diff: float, scale: float, dtype: str) -> bool:
    return diff <= ATOL[dtype] * max(1.0, scale)


def run_ort(path: Path, inputs: Sequence[torch.Tensor], dtype: torch.dtype, complex_inputs, threads=None) -> list:
    return OrtGraph(path, threads)(graph_inputs(inputs, dtype, complex_inputs))


def compare_block_file(path: Path, program: torch.nn.Module, inputs: Sequence[torch.Tensor], dtype: str,
                       torch_dtype: torch.dtype, complex_inputs, threads=None) -> tuple[float, float]:
    """Run the graph at ``path`` and ``program`` (float32 PyTorch) on ``inputs``; ``(max diff, scale)``."""
    with torch.no_grad():
        expected = list(program(*inputs))
    got = run_ort(path, inputs, torch_dtype, complex_inputs, threads)
    return max_abs_diff(got, expected)

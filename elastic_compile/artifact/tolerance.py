"""How close an artifact's graphs must come to the PyTorch elastic model: what the exporter checks every graph
against and the runtime's check of a whole export (``serve/check.py``) holds the loaded model to.

Tolerances are absolute, scaled by the reference's magnitude: ``atol * max(1, max|ref|)``, with atol per export
dtype (the manifest records the one used).
"""
from __future__ import annotations

from typing import Sequence

import torch

ATOL = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 1e-1}


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

"""Interleaved wall-clock comparison of two callables (medians), as every speed figure in this project uses."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timed_speedup(run_dense: Callable[[], object], run_method: Callable[[], object], repeats: int = 5,
                  warmup: int = 1) -> tuple[float, float, float]:
    """(median dense seconds, median method seconds, dense / method): runs alternate in this process, after
    ``warmup`` rounds, without gradients, so both sides see the same machine state."""
    with torch.no_grad():
        for _ in range(warmup):
            run_dense()
            run_method()
        dense, method = [], []
        for _ in range(repeats):
            for fn, sink in ((run_dense, dense), (run_method, method)):
                start = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - start)
    d, m = statistics.median(dense), statistics.median(method)
    return d, m, d / m

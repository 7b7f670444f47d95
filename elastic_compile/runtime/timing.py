"""Interleaved wall-clock comparison of two callables (medians), as every speed figure in this project uses."""
from __future__ import annotations

import random
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


def paired_overhead(run_base: Callable[[], object], run_method: Callable[[], object], pairs: int = 30,
                    warmup: int = 2, seed: int = 0) -> dict:
    """Relative cost of ``run_method`` over ``run_base`` when the two are nearly equal (router overhead).

    A ratio of two medians cannot resolve a 1% difference on a noisy machine, so each pair is timed back to
    back, the order alternates (ABBA: drifts in machine state hit both sides alike), and the result is the
    median of the per-pair ratios with a 95% bootstrap interval. Returns ``base_s``, ``method_s`` (medians),
    ``overhead`` (median pair ratio - 1) and ``interval`` (low, high) of the overhead.
    """
    rng = random.Random(seed)
    base, method, ratios = [], [], []
    with torch.no_grad():
        for _ in range(warmup):
            run_base()
            run_method()
        for pair in range(pairs):
            order = ((run_base, base), (run_method, method))
            for fn, sink in (order if pair % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - start)
            ratios.append(method[-1] / base[-1])
    medians = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(2000))
    return dict(base_s=statistics.median(base), method_s=statistics.median(method),
                overhead=statistics.median(ratios) - 1,
                interval=(medians[int(0.025 * len(medians))] - 1, medians[int(0.975 * len(medians)) - 1] - 1))

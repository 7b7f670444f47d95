"""Interleaved wall-clock comparison of two callables (medians), as every speed figure in this project uses."""
from __future__ import annotations

import random
import statistics
import time
from typing import Callable, Sequence

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


def paired_overhead(run_base: Callable[[], object] | Sequence[Callable[[], object]],
                    run_method: Callable[[], object] | Sequence[Callable[[], object]], pairs: int = 30,
                    warmup: int = 2, seed: int = 0) -> dict:
    """Relative cost of ``run_method`` over ``run_base`` when the two are nearly equal (router overhead).

    A ratio of two medians cannot resolve a 1% difference on a noisy machine, so each pair is timed back to
    back, the order alternates (ABBA: drifts in machine state hit both sides alike), and the result is the
    median of the per-pair ratios with a 95% bootstrap interval. Returns ``base_s``, ``method_s`` (medians),
    ``overhead`` (median pair ratio - 1) and ``interval`` (low, high) of the overhead.

    Either side may be a list of independent instances of the same thing (the same model loaded again): two
    instances differ by where their weights landed in memory, which moved single-instance comparisons by up
    to 2% (DiT-B/2 in ONNX Runtime, batch 1, 2 cores). Pairs then cycle through every (base, method) instance
    combination, ``pairs`` is rounded up to a whole number of cycles, and the interval comes from a two-level
    bootstrap (instances of each side, then pairs within the drawn combinations), so it includes placement.
    """
    bases = list(run_base) if isinstance(run_base, (list, tuple)) else [run_base]
    methods = list(run_method) if isinstance(run_method, (list, tuple)) else [run_method]
    combos = [(i, j) for i in range(len(bases)) for j in range(len(methods))]
    pairs = -(-pairs // len(combos)) * len(combos)
    base, method = [], []
    ratios: dict[tuple[int, int], list[float]] = {combo: [] for combo in combos}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in bases + methods:
                fn()
        for pair in range(pairs):
            i, j = combos[pair % len(combos)]
            order = ((bases[i], base), (methods[j], method))
            for fn, sink in (order if pair % 2 == 0 else order[::-1]):
                start = time.perf_counter()
                fn()
                sink.append(time.perf_counter() - start)
            ratios[i, j].append(method[-1] / base[-1])
    every = [r for combo in combos for r in ratios[combo]]
    rng = random.Random(seed)
    medians = sorted(statistics.median(_resampled(ratios, len(bases), len(methods), rng)) for _ in range(2000))
    return dict(base_s=statistics.median(base), method_s=statistics.median(method),
                overhead=statistics.median(every) - 1,
                interval=(medians[int(0.025 * len(medians))] - 1, medians[int(0.975 * len(medians)) - 1] - 1),
                instances=(len(bases), len(methods)), pairs=pairs)


def _resampled(ratios: dict[tuple[int, int], list[float]], bases: int, methods: int, rng: random.Random) -> list[float]:
    """One bootstrap draw: instances of each side with replacement, then each drawn combination's pair ratios
    with replacement (with one instance a side: the pairs with replacement)."""
    drawn_bases = [rng.randrange(bases) for _ in range(bases)] if bases > 1 else [0]
    drawn_methods = [rng.randrange(methods) for _ in range(methods)] if methods > 1 else [0]
    sample = []
    for i in drawn_bases:
        for j in drawn_methods:
            sample += rng.choices(ratios[i, j], k=len(ratios[i, j]))
    return sample

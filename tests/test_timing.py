"""The benchmarks' interleaved timing helpers (benchmarks/timing.py): statistics checked on a fake clock."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import timing  # noqa: E402


def test_paired_overhead_is_the_median_pair_ratio_on_a_fake_clock(monkeypatch):
    """Statistics only (no wall-clock assertion): a clock that advances 100 (+ drift) per base call and 103
    (+ the same drift) per method call gives +3% whatever the drift, with an interval around it."""
    clock = {"now": 0.0, "drift": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])

    def work(cost):
        def call():
            clock["drift"] += 0.2  # the machine slows down steadily (0.2% per call, 16% over the run)
            clock["now"] += cost * (1 + clock["drift"] / 100)
        return call
    result = timing.paired_overhead(work(100.0), work(103.0), pairs=40, warmup=1)
    assert result["overhead"] == pytest.approx(0.03, abs=2e-3)
    low, high = result["interval"]
    assert low <= 0.03 <= high and high - low < 0.01


def test_paired_overhead_across_instances_cycles_every_combination_on_a_fake_clock(monkeypatch):
    """Instances that differ by placement (here +-2% each, fixed per instance): every (base, method) pair of
    instances is timed, pairs round up to whole cycles, the overhead is the method's own +3%, and the interval
    (instances drawn in the bootstrap) is wider than the one of a single pair of instances."""
    clock = {"now": 0.0}
    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["now"])
    calls = []

    def work(cost, name):
        def call():
            calls.append(name)
            clock["now"] += cost
        return call
    placement = [1.0, 1.02, 0.98]
    bases = [work(100.0 * p, f"b{k}") for k, p in enumerate(placement)]
    methods = [work(103.0 * p, f"m{k}") for k, p in enumerate(placement)]
    result = timing.paired_overhead(bases, methods, pairs=40, warmup=1)
    assert result["pairs"] == 45 and result["instances"] == (3, 3)
    timed = calls[6:]  # after one warm-up call of each instance
    combos = {tuple(sorted(timed[k:k + 2])) for k in range(0, len(timed), 2)}
    assert combos == {(f"b{i}", f"m{j}") for i in range(3) for j in range(3)}
    assert result["overhead"] == pytest.approx(0.03, abs=1e-9)  # the median combination: same placement
    low, high = result["interval"]
    single = timing.paired_overhead(bases[0], methods[1], pairs=40, warmup=1)
    assert low < 0.03 < high and high - low > single["interval"][1] - single["interval"][0]

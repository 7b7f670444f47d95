"""benchmarks/frontier.py: who dominates whom on the speed-fidelity frontier (the dominance table's rules)."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from frontier import best_dominating, dominates, equal_cost_candidates, paired_fid_difference, row_key  # noqa: E402


def row(method, setting, speedup, psnr, fid):
    return dict(method=method, setting=setting, speedup=speedup, psnr=psnr, fid=fid)


PEER = row("FirstBlockCache", "threshold 0.1", 2.0, 40.0, 2.2)


def test_dominance_needs_speed_fidelity_and_fid():
    assert dominates(row("E", "a", 2.0, 40.0, 2.2), PEER) == "strict"          # ties count
    assert dominates(row("E", "a", 1.99, 45.0, 2.0), PEER) is None             # slower
    assert dominates(row("E", "a", 3.0, 39.9, 2.0), PEER) is None              # less faithful
    assert dominates(row("E", "a", 3.0, 45.0, 2.3), PEER) is None              # worse FID, no interval
    assert dominates(row("E", "a", 3.0, 45.0, 2.3), PEER, (-0.1, 0.3)) == "within noise"
    assert dominates(row("E", "a", 3.0, 45.0, 2.3), PEER, (0.05, 0.3)) is None


def test_best_dominating_prefers_strict_then_psnr():
    within = row("E", "within", 3.0, 50.0, 2.3)
    strict_low = row("E", "strict low", 2.5, 41.0, 2.1)
    strict_high = row("E", "strict high", 2.1, 44.0, 2.2)
    slow = row("E", "slow", 1.5, 60.0, 1.0)
    intervals = {(row_key(within), row_key(PEER)): (-0.2, 0.4)}
    found, kind = best_dominating(PEER, [within, strict_low, strict_high, slow], intervals)
    assert found is strict_high and kind == "strict"
    found, kind = best_dominating(PEER, [within, slow], intervals)
    assert found is within and kind == "within noise"
    assert best_dominating(PEER, [slow]) is None


def test_paired_fid_interval_is_centred_on_zero_for_the_same_images_and_positive_for_shifted_ones():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(400, 4))
    features = rng.normal(size=(200, 4))
    low, high = paired_fid_difference(features, features, real, draws=50)
    assert low == high == 0.0
    low, high = paired_fid_difference(features + 1.0, features, real, draws=50)
    assert 0.0 < low <= high


def test_equal_cost_candidates_are_as_cheap_as_faithful_and_slower_only():
    peer = dict(PEER, fraction=0.52)
    tie = dict(row("E", "same FLOPs", 1.95, 41.0, 2.1), fraction=0.52)
    dearer = dict(row("E", "more FLOPs", 1.9, 45.0, 2.0), fraction=0.6)
    faster = dict(row("E", "faster", 2.1, 41.0, 2.1), fraction=0.5)  # dominates already: not asked again
    worse = dict(row("E", "less faithful", 1.99, 39.0, 2.1), fraction=0.52)
    fid_noise = dict(row("E", "FID within noise", 1.98, 42.0, 2.3), fraction=0.5)
    found = equal_cost_candidates(peer, [tie, dearer, faster, worse, fid_noise],
                                  {(row_key(fid_noise), row_key(peer)): (-0.1, 0.2)})
    assert found == [(tie, "strict"), (fid_noise, "within noise")]  # strict first, then PSNR

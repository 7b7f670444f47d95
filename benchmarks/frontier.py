"""Who dominates whom on the speed-fidelity frontier (used by quality.py; pure functions, tested).

A configuration E *dominates* a peer setting P when, in the same benchmark run, E is at least as fast (measured
wall-clock speedup against dense), at least as faithful (PSNR against dense) and no worse in realism (classifier
FID against held-out digits). FID on a hundred 8x8 digits moves by tenths between two image sets that differ in
a few pixels, so besides the strict comparison of the two values the table reports a paired bootstrap interval
of ``FID(E) - FID(P)`` (the same images drawn for both: they come from the same noise and labels); "no worse
within noise" means that interval reaches zero or below.

Speed likewise: two configurations that execute the same FLOPs (e.g. routers serving the very schedule a
router-free mode follows, with other stand-ins) differ in measured speedup by the noise of two separate
measurements, so a candidate that executes no more FLOPs than the peer but measured slower is timed again
against the peer directly (:func:`equal_cost_candidates`; paired, interleaved) and is "as fast within timing
noise" when that interval of its time / the peer's time reaches 1 or below.
"""
from __future__ import annotations

import numpy as np


def paired_fid_difference(features_a: np.ndarray, features_b: np.ndarray, real: np.ndarray, *, draws: int = 300,
                          seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of ``FID(a) - FID(b)``: rows of ``a`` and ``b`` belong together (same noise), and
    each draw resamples the same row indices for both."""
    from elastic_compile.reference.metrics import feature_statistics, frechet_distance

    mu_r, sigma_r = feature_statistics(real)
    rng = np.random.default_rng(seed)
    n = len(features_a)
    differences = []
    for _ in range(draws):
        rows = rng.integers(0, n, n)
        fa = frechet_distance(*feature_statistics(features_a[rows]), mu_r, sigma_r)
        fb = frechet_distance(*feature_statistics(features_b[rows]), mu_r, sigma_r)
        differences.append(fa - fb)
    low, high = np.percentile(differences, [2.5, 97.5])
    return float(low), float(high)


def dominates(candidate: dict, peer: dict, fid_interval: tuple[float, float] | None = None) -> str | None:
    """"strict" if ``candidate`` is at least as fast and faithful with FID <= the peer's, "within noise" if only
    the FID interval (candidate - peer) reaches <= 0, None otherwise."""
    if candidate["speedup"] < peer["speedup"] or candidate["psnr"] < peer["psnr"]:
        return None
    if candidate["fid"] <= peer["fid"]:
        return "strict"
    if fid_interval is not None and fid_interval[0] <= 0.0:
        return "within noise"
    return None


def best_dominating(peer: dict, candidates: list[dict], fid_intervals: dict | None = None) -> tuple[dict, str] | None:
    """The dominating candidate with the highest PSNR, strict dominance preferred; None when none dominates.
    ``fid_intervals[(candidate key, peer key)]``: the paired FID interval, keys as ``row_key``."""
    found = []
    for candidate in candidates:
        interval = (fid_intervals or {}).get((row_key(candidate), row_key(peer)))
        kind = dominates(candidate, peer, interval)
        if kind is not None:
            found.append((kind == "strict", candidate["psnr"], candidate, kind))
    if not found:
        return None
    _, _, candidate, kind = max(found, key=lambda f: (f[0], f[1]))
    return candidate, kind


#: Executed FLOP fractions this close count as equal (FLOP counts of two whole generations, same run).
FLOP_TOLERANCE = 1e-3


def as_cheap(candidate: dict, peer: dict) -> bool:
    """Whether ``candidate`` executes no more FLOPs than ``peer`` (within ``FLOP_TOLERANCE``)."""
    return candidate["fraction"] <= peer["fraction"] + FLOP_TOLERANCE


def equal_cost_candidates(peer: dict, candidates: list[dict], fid_intervals: dict | None = None
                          ) -> list[tuple[dict, str]]:
    """Candidates executing no more FLOPs than ``peer`` (:func:`as_cheap`) that measured slower but
    are at least as faithful and no worse in FID (strictly or within noise), best first (strict FID, then
    PSNR): the ones a paired timing against the peer may still show as fast."""
    found = []
    for candidate in candidates:
        if not as_cheap(candidate, peer) or candidate["speedup"] >= peer["speedup"]:
            continue
        interval = (fid_intervals or {}).get((row_key(candidate), row_key(peer)))
        kind = dominates(dict(candidate, speedup=peer["speedup"]), peer, interval)
        if kind is not None:
            found.append((kind == "strict", candidate["psnr"], candidate, kind))
    return [(candidate, kind) for _, _, candidate, kind in sorted(found, key=lambda f: (f[0], f[1]), reverse=True)]


def row_key(row: dict) -> str:
    return f"{row['method']} | {row['setting']}"

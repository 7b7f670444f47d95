"""The feature cache's rules, stated once: per sample, whether a block runs, and what stands in for it if not.

A sample the block does not run for gets its residual input plus a *stand-in* for the block's update, by code:

* ``IDENTITY`` (0): nothing, the block is left out;
* one code per skip action of ``ElasticConfig.skip_actions`` (:data:`CODES`): the block's update extrapolated
  from its own history (``forecast.py``): "reuse" the last update, "forecast" / "forecast2" a first / second
  order extrapolation. An action is available where the block has stored as many updates for the sample as
  it reads, or ``forecast_min_points`` of them (2 by default: a forecast needs a slope and never stands in as a
  reuse of one update; "reuse" needs one; a second-order forecast with two points is first order), and stand-ins
  took its place fewer than ``max_reuse`` times in a row.

Per sample, from the router's (or ``force``'s) decision, the action it chose (routers with an action head; else
the first skip action) and whether a stand-in is available:

* a skipped sample takes its action's stand-in where available, else identity;
* band rule (``band`` set): a sample the router runs only barely (its run probability in ``[tau, tau + band)``)
  takes a stand-in instead of running where one is available; then only those do, a skip stays identity;
* ``fallback="run"``: nothing is left out: a sample that would get identity runs instead (refreshing the cache).

:func:`plan` is those rules, for per-sample flags held either as Python lists (the host gate between two blocks,
where a tensor op would cost more than the decision) or as tensors (device routing, inside a captured graph where
a host copy is impossible); :data:`HOST` and :data:`DEVICE` say how flags combine in each. The gates pass codes
along and never look at them; the cache's entries (``store.py``) turn codes into values.
"""
from __future__ import annotations

import math

import torch

from ..config import SKIP_ACTIONS

IDENTITY = 0
#: Stand-in code of each skip action.
CODES = {name: code for code, name in enumerate(SKIP_ACTIONS, start=1)}
#: How many stored updates each stand-in code reads.
POINTS = {code: SKIP_ACTIONS[name] for name, code in CODES.items()}


def logit_of(probability: float) -> float:
    """The run logit whose sigmoid is ``probability`` (``inf`` for 1 and above)."""
    return math.log(probability / (1.0 - probability)) if probability < 1.0 else math.inf


class HostFlags:
    """Per-sample flags as Python lists: ``[bool]``, stand-ins ``[int]``, run probabilities ``[float]``."""

    @staticmethod
    def both(a, b):
        return [x and y for x, y in zip(a, b)]

    @staticmethod
    def either(a, b):
        return [x or y for x, y in zip(a, b)]

    @staticmethod
    def negated(a):
        return [not x for x in a]

    @staticmethod
    def select(mask, yes, no):
        return [y if m else n for m, y, n in zip(mask, yes, no)]

    @staticmethod
    def filled(like, value):
        return [value] * len(like)

    @staticmethod
    def below(run, p_run, probability):
        """Samples that run with a run probability below ``probability``."""
        return [r and p < probability for r, p in zip(run, p_run)]


class DeviceFlags:
    """Per-sample flags as tensors of the batch: bool, stand-ins int64, run logits (a NaN logit runs, never
    barely: it compares False)."""

    both = staticmethod(torch.logical_and)
    either = staticmethod(torch.logical_or)
    negated = staticmethod(torch.logical_not)
    select = staticmethod(torch.where)

    @staticmethod
    def filled(like, value):
        return torch.full(like.shape, value, device=like.device)  # bool flags, int64 codes: the value's type

    @staticmethod
    def below(run, run_logit, probability):
        return run & (run_logit < logit_of(probability))


HOST = HostFlags()
DEVICE = DeviceFlags()


def plan(flags, config, threshold: float, run, scores, usable, choice):
    """``(run, stand_in)`` per sample after the cache's rules (module docstring).

    ``run``: the decision before the cache; ``scores``: what the router decided ``run`` from (host: run
    probabilities, device: run logits), None where it did not decide (``force``, or a block that cannot skip):
    the band rule then leaves ``run`` alone; ``usable``: where a stand-in can be served (``Entry.usable``);
    ``choice``: per sample, the stand-in code of its skip action. ``config``: a ``FeatureCacheConfig``;
    ``threshold``: tau."""
    if config.band is None:
        takes = flags.both(flags.negated(run), usable)
    else:
        barely = flags.filled(run, False) if scores is None else flags.below(run, scores, threshold + config.band)
        takes = flags.both(barely, usable)
        run = flags.both(run, flags.negated(takes))
    if config.fallback == "run":
        takes = flags.either(takes, flags.both(flags.negated(run), usable))
        run = flags.either(run, flags.negated(takes))
    return run, flags.select(takes, choice, flags.filled(run, IDENTITY))

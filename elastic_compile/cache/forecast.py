"""Skip actions: what a skipped block returns, computed from the history of its own residual updates.

A block that ran for a sample at steps ``t_1 < ... < t_n`` with updates ``d_i = out_i - in_i`` is approximated at a
later step ``t`` by the polynomial of degree ``n - 1`` through those points (Lagrange form)::

    d(t) = sum_i  w_i(t) d_i,   w_i(t) = prod_{j != i} (t - t_j) / (t_i - t_j)

and the skipped block returns ``in + d(t)``. One point is "reuse the last update"; two a first-order forecast (the
last update plus its last slope times the steps since); three a second-order one. TaylorSeer extrapolates module
outputs with the same family (its finite differences are the Newton form of this polynomial) at fixed intervals;
here the points are wherever the router let the block run, so the weights take the actual spacing. Steps are
counted per cache context (one per classifier-free-guidance branch), one per model call.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import SKIP_ACTIONS
from ..errors import ConfigError


def history_points(action: str) -> int:
    """How many past updates ``action`` reads."""
    try:
        return SKIP_ACTIONS[action]
    except KeyError:
        raise ConfigError(f"a skip action in {sorted(SKIP_ACTIONS)}", repr(action),
                          "Use 'reuse' (last update), 'forecast' (first order) or 'forecast2' (second order).") from None


def lagrange_weights(stamps: Sequence[float], at: float) -> list[float]:
    """``w_i(at)`` for history points at distinct ``stamps``; they sum to 1 and reproduce polynomials of degree
    ``len(stamps) - 1`` exactly."""
    weights = []
    for i, ti in enumerate(stamps):
        w = 1.0
        for j, tj in enumerate(stamps):
            if j != i:
                w *= (at - tj) / (ti - tj)
        weights.append(w)
    return weights


def lagrange_weight_rows(stamps: torch.Tensor, count: torch.Tensor, at: torch.Tensor | float) -> torch.Tensor:
    """Per-sample weights on device tensors: ``stamps`` (B, H) oldest first, of which the last ``count`` (B,) are
    valid points; ``at`` the step (scalar or (B,)). Returns (B, H) weights, zero on unused slots (rows with
    ``count == 0`` get all zeros)."""
    batch, depth = stamps.shape
    at = torch.as_tensor(at, dtype=stamps.dtype, device=stamps.device).expand(batch)
    slot = torch.arange(depth, device=stamps.device)
    valid = slot[None, :] >= (depth - count)[:, None]                       # (B, H)
    weights = valid.to(stamps.dtype)
    for i in range(depth):
        for j in range(depth):
            if i == j:
                continue
            both = valid[:, i] & valid[:, j]
            gap = torch.where(both, stamps[:, i] - stamps[:, j], torch.ones_like(at))
            factor = torch.where(both, (at - stamps[:, j]) / gap, torch.ones_like(at))
            weights[:, i] = weights[:, i] * factor
    return weights

"""How a router's logits become decisions, on the host (Python floats) and on the device (tensors).

Router logits per sample are ``[run logit, width logits..., skip-action logits...]`` (the last part only for
routers with an action head). A block runs for a sample iff ``sigmoid(run logit) >= threshold``; it runs at the
first argmax of its width logits; a skipped sample takes the first argmax of its action logits (what stands in
for the block when the feature cache is on). Non-finite logits (non-finite block inputs) mean "run, at the dense width", so a broken input never
silently drops a block (and a NaN action logit means the first action). The host functions decide from one device-to-host copy of the logits; the device
functions decide without one (``nn/gate/device.py``); the tests hold both to the same answers.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

# p >= threshold with p = sigmoid(logit) is logit >= run_logit_threshold(threshold); one definition, shared with
# the feature cache's band rule (which compares device logits the same way)
from ...cache.rules import logit_of as run_logit_threshold


def run_probability(logit: float) -> float:
    """sigmoid(logit) on the host, without overflow; a NaN logit (non-finite block inputs) means "run"."""
    return 1.0 if logit != logit else 0.5 * (1.0 + math.tanh(0.5 * logit))


def best_bucket(logits: list[float]) -> int:
    """argmax (first maximum, as torch.argmax); any NaN logit means the dense bucket (the last)."""
    total = sum(logits)  # NaN when a logit is NaN (or infinities of both signs: then look closer)
    if total != total and any(w != w for w in logits):
        return len(logits) - 1
    return logits.index(max(logits))


def host_decisions(rows: list[list[float]], threshold: float, decide_run: bool, decide_bucket: bool,
                   num_widths: int | None = None):
    """``(run, bucket, p_run)`` per row of router logits: :func:`run_probability` >= ``threshold`` and
    :func:`best_bucket` of the ``num_widths`` width logits (None: all logits after the run logit). A list is None
    where not decided here."""
    p_run = [run_probability(row[0]) for row in rows] if decide_run else None
    run = [p >= threshold for p in p_run] if decide_run else None
    end = None if num_widths is None else 1 + num_widths
    bucket = [best_bucket(row[1:end]) for row in rows] if decide_bucket else None
    return run, bucket, p_run


def best_action(logits: list[float]) -> int:
    """argmax (first maximum) of skip-action logits; any NaN logit means the first action."""
    total = sum(logits)
    if total != total and any(a != a for a in logits):
        return 0
    return logits.index(max(logits))


def host_actions(rows: list[list[float]], num_widths: int) -> list[int]:
    """Per row of router logits, the skip action it chose (:func:`best_action` of the logits after the widths)."""
    return [best_action(row[1 + num_widths:]) for row in rows]


def device_actions(logits: torch.Tensor, num_widths: int) -> torch.Tensor:
    """:func:`host_actions` on the device: (B,) long."""
    actions = logits[:, 1 + num_widths:].float()
    return torch.where(torch.isnan(actions).any(dim=-1), 0, actions.argmax(dim=-1))


def device_decisions(logits: torch.Tensor, can_skip: bool, elastic_width: bool, threshold: float,
                     dense_bucket: int, num_widths: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(run (B,) bool, bucket (B,) long)`` from router logits, on their device, as the host gate
    decides them: run iff sigmoid(run logit) >= threshold (a NaN logit runs); bucket = first argmax of the width
    logits (any NaN: the dense bucket)."""
    logits = logits.float()
    batch = logits.shape[0]
    if can_skip:  # "not below" rather than ">=": a NaN logit compares False both ways and must run
        run = (logits[:, 0] < run_logit_threshold(threshold)).logical_not()
    else:
        run = torch.ones(batch, dtype=torch.bool, device=logits.device)
    if elastic_width:
        widths = logits[:, 1:] if num_widths is None else logits[:, 1:1 + num_widths]
        bucket = torch.where(torch.isnan(widths).any(dim=-1), dense_bucket, widths.argmax(dim=-1))
    else:
        bucket = torch.full((batch,), dense_bucket, dtype=torch.long, device=logits.device)
    return run, bucket


_COMPILED_DECISIONS = None


def fused_decisions() -> Callable:
    """:func:`device_decisions` through ``torch.compile``: its seven tiny element-wise ops and reductions become
    one or two kernels (on a GPU, inside a captured graph, each kernel node costs a few microseconds). Compiled
    on first use for each (shape, flags) combination, which must happen outside a capture (the warm-up)."""
    global _COMPILED_DECISIONS
    if _COMPILED_DECISIONS is None:
        _COMPILED_DECISIONS = torch.compile(device_decisions, dynamic=False)
    return _COMPILED_DECISIONS

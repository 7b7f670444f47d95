"""Soft training, the gate's mode while routers train (``train_routers`` sets ``state.soft``): decisions stay
differentiable through straight-through estimators.

Every sample runs the dense block with a per-sample unit mask ``m = m_hard + m_soft - sg(m_soft)``
(``m_soft = softmax(width_logits) @ prefix_masks``) and its output is ``x + g * (block(x) - x)`` with
``g = 1[p >= tau] + p - sg(p)``: forward values equal the hard decisions, gradients reach the logits. With
cache-aware training (``state.soft_skip_deltas``), a skip adds the previous step's update, as the feature cache
serves it: ``x + g * (block(x) - x) + (1 - g) * delta_prev``. Each call records ``(block, p_run, width_probs,
hard_run, hard_bucket)`` in ``state.soft_records`` for the compute-budget term (``train/budget.py``).
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ...batch import per_sample
from ...capture.treespec import flatten_output
from ...state import BlockCall


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Value of ``hard``, gradient of ``soft``."""
    return hard.to(soft.dtype) + soft - soft.detach()


def forward(gate, args: tuple, kwargs: dict):
    state, dense = gate.state, gate.state.dense_bucket
    arguments = gate.bind(args, kwargs)
    batch = gate.stream_batch(arguments)
    if gate.router is None:
        state.soft_records.append((gate.index, None, None, None, None))
        state.record(BlockCall(gate.index, [True] * batch, [dense] * batch, False))
        return gate.original_forward(*args, **kwargs)
    run_logit, width_logits = gate.router(arguments)
    can_skip = gate.spec.skippable and state.config.allow_skip
    p_run = torch.sigmoid(run_logit.float()) if can_skip else None
    probs = torch.softmax(width_logits.float(), dim=-1) if gate.spec.elastic_width else None
    hard_run = p_run >= state.config.threshold if p_run is not None else torch.ones(batch, dtype=torch.bool)
    hard_bucket = probs.argmax(dim=-1) if probs is not None else torch.full((batch,), dense)
    if probs is not None:
        gate.control.unit_masks = {site: straight_through(prefix[hard_bucket], probs @ prefix)
                                   for site, prefix in enumerate(gate.prefix_masks(probs.device))}
    try:
        out = gate.original_forward(*args, **kwargs)
    finally:
        gate.control.unit_masks = None
    state.soft_records.append((gate.index, p_run, probs, hard_run, hard_bucket))
    state.record(BlockCall(gate.index, hard_run.tolist(), hard_bucket.tolist(), True))
    if p_run is None:
        return out
    g_run = straight_through(hard_run, p_run)
    leaves, _ = flatten_output(out)
    cached = (state.soft_skip_deltas or {}).get(gate.index, {})
    for i, name in gate.spec.residual_of.items():
        x = arguments[name]
        g = per_sample(g_run.to(x.dtype), x)
        leaves[i] = x + g * (leaves[i] - x)
        if i in cached:  # a skipped sample takes the previous step's update, as the feature cache serves it
            leaves[i] = leaves[i] + (1 - g) * cached[i].to(x.dtype)
    return pytree.tree_unflatten(leaves, gate.output_spec)

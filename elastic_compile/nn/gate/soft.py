"""Soft training, the gate's mode while routers train (``train_routers`` sets ``state.soft``): decisions stay
differentiable through straight-through estimators.

Every sample runs the dense block with a per-sample unit mask ``m = m_hard + m_soft - sg(m_soft)``
(``m_soft = softmax(width_logits) @ prefix_masks``) and its output is ``x + g * (block(x) - x) + (1 - g) * s``
with ``g = 1[p >= tau] + p - sg(p)``: forward values equal the hard decisions, gradients reach the logits. ``s``
is what stands in for a skipped block:

* nothing (plain training: a skip leaves the block out);
* per-step cache-aware training (``state.soft_stand_ins``): per skip action, the stand-in the feature cache would
  serve, computed by the trainer from the dense model's updates at earlier steps (``train/cache_aware.py``);
* rollout training (``state.cache`` set while soft): the feature cache itself, in the loop, with the rules it is
  served with (``elastic_compile/cache/rules.py``): where those rules override the router (no update stored yet,
  too many stand-ins in a row, the band rule) the gate is the rules' constant decision, and the block's updates
  are stored with their autograd graph, so a stand-in's gradient reaches the steps it was extrapolated from.

With several skip actions the stand-in is ``sum_a w_a s_a`` with ``w = onehot(argmax q) + q - sg(q)``, ``q`` the
softmax of the router's action logits. Each call records ``(block, p_run, width_probs, hard_run, hard_bucket)``
in ``state.soft_records`` for the compute-budget term (``train/budget.py``), ``p_run`` and ``hard_run`` as the
rules left them.

Memory (``state.soft_checkpoint``, ``train_routers(activation_checkpointing=True)``): each block's dense forward
runs under ``torch.utils.checkpoint`` (non-reentrant), so backward recomputes its activations instead of keeping
them: activation memory of one block instead of all. The recomputation sets the same unit masks, so gradients
are those of the plain run. Routers always run in float32 with autocast off (mixed precision is for the frozen
base; the routers' small logits and their gradients stay exact).
"""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from ...batch import per_sample
from ...cache.rules import IDENTITY
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
        return run_block(gate, args, kwargs, None)
    with torch.autocast(next(gate.router.parameters()).device.type, enabled=False):
        run_logit, width_logits, *action_logits = gate.router(arguments)
    can_skip = gate.spec.skippable and state.config.allow_skip
    p_run = torch.sigmoid(run_logit.float()) if can_skip else None
    probs = torch.softmax(width_logits.float(), dim=-1) if gate.spec.elastic_width else None
    hard_run = p_run >= state.config.threshold if p_run is not None else torch.ones(batch, dtype=torch.bool)
    hard_bucket = probs.argmax(dim=-1) if probs is not None else torch.full((batch,), dense)
    masks = None
    if probs is not None:
        masks = {site: straight_through(prefix[hard_bucket], probs @ prefix)
                 for site, prefix in enumerate(gate.prefix_masks(probs.device))}
    out = run_block(gate, args, kwargs, masks)
    if p_run is None:
        state.soft_records.append((gate.index, None, probs, hard_run, hard_bucket))
        state.record(BlockCall(gate.index, hard_run.tolist(), hard_bucket.tolist(), True))
        return out
    q = torch.softmax(action_logits[0].float(), dim=-1) if action_logits else None
    leaves, _ = flatten_output(out)
    inputs = gate.residual_inputs(arguments)
    outputs = {i: leaves[i] for i in gate.spec.residual_of}
    if state.cache is not None:
        p_run, hard_run, stand_in = cache_in_the_loop(gate, state.cache, inputs, outputs, p_run, hard_run, q, batch)
    else:
        stand_in = per_step_stand_ins(state.soft_stand_ins, gate.index, inputs, q)
    state.soft_records.append((gate.index, p_run, probs, hard_run, hard_bucket))
    state.record(BlockCall(gate.index, hard_run.tolist(), hard_bucket.tolist(), True))
    g_run = straight_through(hard_run, p_run)
    for i, x in inputs.items():
        g = per_sample(g_run.to(x.dtype), x)
        leaves[i] = x + g * (outputs[i] - x)
        if stand_in is not None:
            leaves[i] = leaves[i] + (1 - g) * stand_in[i].to(x.dtype)
    return pytree.tree_unflatten(leaves, gate.output_spec)


def run_block(gate, args: tuple, kwargs: dict, masks: dict | None):
    """The dense block with the unit masks set, checkpointed when ``state.soft_checkpoint`` (the recomputation
    in backward sets the same masks)."""
    def call():
        gate.control.unit_masks = masks
        try:
            return gate.original_forward(*args, **kwargs)
        finally:
            gate.control.unit_masks = None
    if not gate.state.soft_checkpoint or not torch.is_grad_enabled():
        return call()
    from torch.utils.checkpoint import checkpoint
    return checkpoint(call, use_reentrant=False)


def mixed(candidates: list[dict[int, torch.Tensor]], q: torch.Tensor | None) -> dict[int, torch.Tensor]:
    """Per residual output, ``sum_a w_a candidates[a]`` with straight-through action weights (the first
    candidate alone without an action head)."""
    if q is None or len(candidates) == 1:
        return candidates[0]
    w = straight_through(torch.nn.functional.one_hot(q.argmax(dim=-1), q.shape[-1]), q)
    return {i: sum(per_sample(w[:, a].to(c[i].dtype), c[i]) * c[i] for a, c in enumerate(candidates))
            for i in candidates[0]}


def per_step_stand_ins(stand_ins: dict | None, block: int, inputs: dict, q) -> dict[int, torch.Tensor] | None:
    """The trainer's stand-ins of ``block`` (``{leaf: (A, B, ...)}``, one per skip action), mixed by action."""
    cached = (stand_ins or {}).get(block)
    if not cached:
        return None
    actions = next(iter(cached.values())).shape[0]
    return mixed([{i: cached[i][a] for i in inputs} for a in range(actions)], q)


def cache_in_the_loop(gate, cache, inputs: dict, outputs: dict, p_run, hard_run, q, batch: int):
    """The feature cache as served, inside a differentiable rollout: ``(p_run, run, stand-in values)`` after the
    cache's rules, and the block's updates stored for later steps (with their graph)."""
    entry = cache.entry(gate.index, batch)
    entry.tick()
    actions = q.argmax(dim=-1).tolist() if q is not None else None
    run, stand_in = cache.plan(entry, hard_run.tolist(), p_run.tolist(), gate.state.config.threshold, actions)
    ran = torch.tensor(run, device=p_run.device)
    # where the rules overrode the router the gate is their constant decision (no gradient to the router)
    p_run = torch.where(ran != hard_run, ran.to(p_run.dtype), p_run)
    values = None
    if any(code != IDENTITY for code in stand_in):
        codes = [cache.codes[a] for a in range(len(cache.skip_actions))] if q is not None else [None]
        candidates = [entry.stand_ins([c if (s != IDENTITY and c is not None) else s for s in stand_in], inputs)
                      for c in codes]
        values = mixed(candidates, q)
        entry.count(stand_in)
    entry.store(inputs, outputs, run, keep_graph=True)
    return p_run, ran, values

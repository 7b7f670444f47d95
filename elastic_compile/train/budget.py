"""The compute-budget term: executed FLOP fraction per sample, differentiable in the routers' outputs."""
from __future__ import annotations

import torch

from ..nn.gate.profile import FlopTable
from ..nn.gate.soft import straight_through


def executed_flops_fraction(soft_records: list, table: FlopTable, routers: dict, batch: int,
                            skip_cost: float = 0.0) -> torch.Tensor:
    """Per-sample executed FLOPs / dense FLOPs of the hard decisions, with straight-through gradients.

    A block call contributes ``g * sum_k w_k F_k`` where ``g = 1[p >= tau] + p - sg(p)`` and
    ``w = onehot(argmax q) + q - sg(q)`` (``p``: run probability, ``q``: width-bucket probabilities, ``F_k``: the
    block's FLOPs per sample at bucket k): the forward value is exactly what the hard decisions execute (the
    number ``stats`` reports), the gradient is that of the expected FLOPs. Blocks without a decision contribute
    their dense FLOPs; FLOPs outside blocks and router FLOPs are constant. ``skip_cost``: the share of a block's
    FLOPs a skip still costs on average (with a feature cache of K reuses that falls back to running, a block
    skipped at every step still runs one step in K + 1): a skip contributes ``(g + (1 - g) * skip_cost) * F``.
    """
    dense_per_sample = table.dense_total / batch
    profiled: dict[int, list[list[int]]] = {}
    for block, flops in table.block_calls:
        profiled.setdefault(block, []).append(flops)
    occurrences: dict[int, int] = {}
    total = None
    constant = table.non_block / batch
    for block, p_run, probs, hard_run, hard_bucket in soft_records:
        k = occurrences.get(block, 0)
        occurrences[block] = k + 1
        flops = torch.tensor(profiled[block][k], dtype=torch.float32) / batch
        router = routers.get(block)
        if router is not None and p_run is not None or probs is not None:
            constant += router.flops_per_sample()
        if probs is None and p_run is None:
            constant += float(flops[-1])
            continue
        device = (probs if probs is not None else p_run).device
        flops = flops.to(device)
        if probs is not None:
            one_hot = torch.nn.functional.one_hot(hard_bucket.to(device), probs.shape[1])
            per_sample = straight_through(one_hot, probs) @ flops
        else:
            per_sample = flops[-1].expand(batch)
        if p_run is not None:
            gate = straight_through(hard_run, p_run)
            per_sample = (gate + (1 - gate) * skip_cost) * per_sample
        total = per_sample if total is None else total + per_sample
    if total is None:
        total = torch.zeros(batch)
    return (total + constant) / dense_per_sample

"""Numerical checks of a rewritten block against its own exported dense graph.

``masked_reference`` evaluates the block's graph with the live (permuted) weights while zeroing, at the
out-projection input, every hidden unit a width bucket drops: an independent implementation of "the FFN with
only its first k units", which the sliced eager execution must match.
"""
from __future__ import annotations

import torch
from torch import fx

from ..capture.export import ExportedBlock, GraphEvaluator
from .ops import CONV_OPS, op_name, param_source
from .spec import FFNSite


def _out_projection_nodes(exported: ExportedBlock, site: FFNSite) -> list[fx.Node]:
    found = []
    for node in exported.graph_module.graph.nodes:
        if op_name(node) == "linear" or op_name(node) in CONV_OPS:
            weight = param_source(node.args[1])
            if weight is not None and weight.target == site.out_projection.param:
                found.append(node)
    return found


def masked_reference(exported: ExportedBlock, block, flat_inputs: list, sites: list[FFNSite], width: float) -> list:
    """Graph outputs with each site cut to ``width`` by zeroing dropped units at its out-projection input."""
    masks: dict[fx.Node, tuple[int, int, int]] = {}
    for site in sites:
        keep = site.units_at(width)
        offset = site.out_projection.unit_starts[0]
        for node in _out_projection_nodes(exported, site):
            axis = 1 if op_name(node) in CONV_OPS else -1
            masks[node] = (axis, offset + keep, offset + site.hidden)

    def override(node, args, kwargs, compute):
        if node not in masks:
            return compute()
        axis, start, stop = masks[node]
        x = args[0].clone()
        x.narrow(axis, start, stop - start).zero_()
        return node.target(x, *args[1:], **kwargs)

    with torch.no_grad():
        return GraphEvaluator(exported, block, override).evaluate(flat_inputs)


def max_abs_difference(a: list, b: list) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            worst = max(worst, float((x.float() - y.float()).abs().max()) if x.numel() else 0.0)
    return worst

"""Pass: order each FFN's hidden units by importance, most important first.

Guarantee: the permutation is applied consistently to every parameter that holds the units (in-projection
rows, biases, per-unit params, out-projection columns), so the dense block computes exactly the same function
(up to float summation order); afterwards every width bucket keeps a prefix of the most important units.
"""
from __future__ import annotations

import torch
from torch import nn

from ..analysis.spec import FFNSite, ParamSlice


def get_param(block: nn.Module, name: str) -> torch.Tensor:
    return block.get_parameter(name)


def _unit_norms(param: torch.Tensor, piece: ParamSlice, hidden: int) -> torch.Tensor:
    """Squared L2 norm of each unit's slice of ``param`` (summed over all of its positions)."""
    data = param.detach().float().movedim(piece.dim, 0)
    total = torch.zeros(hidden, device=data.device)
    for start in piece.unit_starts:
        total += data[start:start + hidden].reshape(hidden, -1).pow(2).sum(dim=1)
    return total


def unit_importance(block: nn.Module, site: FFNSite, mean_abs_activation: torch.Tensor | None = None) -> torch.Tensor:
    """Score per hidden unit.

    Weight-based (default): ``||W_out[:, j]|| * ||W_in[j, :]||`` (in-projection rows of all matrices holding
    unit j). Activation-based: ``E|h_j| * ||W_out[:, j]||`` where ``h`` is the out-projection input measured on
    calibration data.
    """
    out = site.out_projection
    out_norm = _unit_norms(get_param(block, out.param), out, site.hidden).sqrt()
    if mean_abs_activation is not None:
        return mean_abs_activation.to(out_norm.device).float() * out_norm
    in_norm = torch.zeros_like(out_norm)
    for piece in site.in_projections:
        param = get_param(block, piece.param)
        if param.ndim >= 2:
            in_norm += _unit_norms(param, piece, site.hidden)
    return out_norm * in_norm.sqrt()


def apply_unit_permutation(block: nn.Module, site: FFNSite, order: torch.Tensor) -> None:
    """Reorder the units of ``site`` in place: new unit j is old unit ``order[j]``."""
    order_list = [int(i) for i in order]
    with torch.no_grad():
        for piece in site.all_slices():
            param = get_param(block, piece.param)
            index = torch.tensor(piece.permutation(order_list, param.shape[piece.dim]), device=param.device)
            param.copy_(param.index_select(piece.dim, index))


def order_neurons(block: nn.Module, site: FFNSite, mean_abs_activation: torch.Tensor | None = None) -> torch.Tensor:
    """Permute ``site``'s units by decreasing importance; returns the permutation applied (int64)."""
    scores = unit_importance(block, site, mean_abs_activation)
    order = torch.argsort(scores, descending=True, stable=True).cpu()
    apply_unit_permutation(block, site, order)
    return order

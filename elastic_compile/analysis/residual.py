"""Residual structure of a block, found by evaluating its graph's skip path.

The skip path of a block is what its graph computes when every op that is not a pure data movement (add,
cat, slice, split, views, casts) returns zeros. A block output that equals a block input *exactly* on that
path is a residual update of that input: ``out = in + f(...)``. This handles plain residuals, gated adaLN
residuals, and joint blocks that concatenate text and image tokens and split them again (Flux single-stream),
without looking at names or shapes alone.
"""
from __future__ import annotations

import torch
from torch import fx
from torch.utils import _pytree as pytree

from ..capture.export import ExportedBlock, GraphEvaluator
from .ops import LAYOUT_OPS, NO_VALUE_OPS, SPLIT_OPS, IDENTITY_OPS, op_name

_SKIP_PATH_OPS = LAYOUT_OPS | SPLIT_OPS | IDENTITY_OPS | {"add", "sub", "cat", "slice", "select", "getitem", "clamp",
                                                          "narrow", "index_select"}


def _zeros_like_value(val):
    """Zeros with the value's shape *and strides*: a later ``view`` that is legal on the real value (after a
    ``transpose`` of an attention output laid out token-major) stays legal on the skip path."""
    if isinstance(val, torch.Tensor):
        return torch.zeros_like(val) if val.is_floating_point() or val.is_complex() else val
    if isinstance(val, (tuple, list)):
        return type(val)(_zeros_like_value(v) for v in val)
    return val


def _reads_float(args, kwargs) -> bool:
    return any(isinstance(a, torch.Tensor) and (a.is_floating_point() or a.is_complex())
               for a in pytree.tree_leaves((list(args), kwargs)))


def _skip_path_override(node: fx.Node, args, kwargs, compute):
    name = op_name(node)
    if name in NO_VALUE_OPS:
        return None
    if not _reads_float(args, kwargs):
        return compute()  # index, mask and size arithmetic (lengths read with .item()) keeps its real values
    if name in _SKIP_PATH_OPS:
        if name == "index_select" or name == "clamp":
            return compute() if name == "index_select" else args[0]
        return compute()
    if name == "mul" and not all(isinstance(a, torch.Tensor) for a in args[:2]):
        return compute()  # scaling by a Python number keeps the path (and the scale shows in the result)
    return _zeros_like_value(compute())  # the real op's layout, zeroed


def find_residual_pairs(exported: ExportedBlock, flat_inputs: list, module) -> dict[int, str]:
    """Map each block output leaf index to the argument name it is a residual update of.

    Every floating-point input gets a distinct random probe; an output is a residual of input ``x`` iff on the
    skip path it equals ``x``'s probe exactly.
    """
    generator = torch.Generator().manual_seed(0)
    probes, probe_names = [], []
    for value, name in zip(flat_inputs, exported.input_names):
        if isinstance(value, torch.Tensor) and value.is_floating_point() and name is not None:
            probe = torch.randn(value.shape, generator=generator).to(value.dtype)
            probes.append(probe)
            probe_names.append(name)
        elif isinstance(value, torch.Tensor):
            probes.append(value.detach().cpu())  # masks, ids, lengths: their real values
            probe_names.append(None)
        else:
            probes.append(value)
            probe_names.append(None)
    evaluator = GraphEvaluator(exported, _CpuZeroModule(module), _skip_path_override)
    with torch.no_grad():
        outputs = evaluator.evaluate(probes)
    pairs: dict[int, str] = {}
    for index, out in enumerate(outputs):
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            continue
        for probe, name in zip(probes, probe_names):
            if name is not None and probe.shape == out.shape and torch.equal(out, probe):
                pairs[index] = name
                break
    return pairs


class _CpuZeroModule:
    """Parameters are irrelevant on the skip path (every op reading them is zeroed), only their shapes are."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        value = getattr(self._module, name)
        if isinstance(value, torch.Tensor):
            return torch.zeros(value.shape, dtype=value.dtype)
        if isinstance(value, torch.nn.Module):
            return _CpuZeroModule(value)
        return value


def has_token_mixing(exported: ExportedBlock) -> bool:
    """True when the graph mixes tokens: attention (SDPA or flex attention), or a matmul between two activations
    (linear attention)."""
    from .ops import TOKEN_MIXING_OPS, param_source
    for node in exported.graph_module.graph.nodes:
        name = op_name(node)
        if name in ("scaled_dot_product_attention", "flex_attention") or name.startswith("_scaled_dot_product"):
            return True  # flex_attention: the higher-order op of torch.nn.attention.flex_attention (Kandinsky 6 SR)
        if name in TOKEN_MIXING_OPS:
            operands = [a for a in pytree.tree_leaves(list(node.args)) if isinstance(a, fx.Node)]
            if len(operands) >= 2 and all(param_source(a) is None for a in operands):
                return True
    return False

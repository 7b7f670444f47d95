"""Pass: drop the dimensions a ``squeeze`` names that are not of size 1 (PyTorch ignores them, ONNX rejects them).

``torch.squeeze(x, 1)`` on a ``(2, 16, 32)`` tensor returns it unchanged; the ONNX ``Squeeze`` the exporter emits
for it fails shape inference ("Dimension of input ... must be 1"), so ``onnx.checker`` refuses the graph (seen in
PixArt's caption projection, outside its blocks). On a graph with static shapes (``meta["val"]`` on every node,
as torch.export leaves it) this pass rewrites each ``aten.squeeze.dim`` / ``aten.squeeze.dims`` node: a squeeze
that removes nothing is replaced by its input, one that removes some of its dimensions keeps only those.

Guarantee: the graph computes the same values (same shapes, same data); nodes without shape metadata are left
as they are.
"""
from __future__ import annotations

import torch
from torch import fx

_SQUEEZE_DIM = torch.ops.aten.squeeze.dim
_SQUEEZE_DIMS = torch.ops.aten.squeeze.dims


def drop_noop_squeeze_dims(gm: fx.GraphModule) -> int:
    """Rewrite ``gm`` in place (see the module docstring); returns how many nodes changed."""
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in (_SQUEEZE_DIM, _SQUEEZE_DIMS):
            continue
        source = node.args[0]
        value = source.meta.get("val") if isinstance(source, fx.Node) else None
        if not isinstance(value, torch.Tensor):
            continue
        dims = node.args[1] if node.target is _SQUEEZE_DIMS else [node.args[1]]
        rank = value.dim()
        kept = [d for d in dims if rank and value.shape[d % rank] == 1]
        if len(kept) == len(dims):
            continue
        if kept:
            with gm.graph.inserting_before(node):
                replacement = gm.graph.call_function(_SQUEEZE_DIMS, (source, kept))
            replacement.meta = dict(node.meta)
        else:
            replacement = source
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        changed += 1
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed

"""Per-sample values over batch-first tensors (the gates, the feature cache and cache-aware training share them)."""
from __future__ import annotations

import torch
from torch.utils import _pytree as pytree


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (B,) reshaped to (B, 1, ..., 1) so it broadcasts against ``like`` (B, ...)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


def select_rows(tree, index: torch.Tensor, batch: int):
    """Rows ``index`` of every tensor whose leading dimension is the batch; other values pass unchanged."""
    return pytree.tree_map(
        lambda x: x.index_select(0, index) if isinstance(x, torch.Tensor) and x.ndim > 0 and x.shape[0] == batch else x,
        tree)


def device_of(tree) -> torch.device:
    """The device of the first tensor in ``tree`` (CPU when it holds none)."""
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")

"""Per-sample values over a batch-first tensor (the gates, the feature cache and cache-aware training share it)."""
from __future__ import annotations

import torch


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (B,) reshaped to (B, 1, ..., 1) so it broadcasts against ``like`` (B, ...)."""
    return values.reshape((-1,) + (1,) * (like.ndim - 1))

"""The per-block width switch: the gate sets it, the width-sliced projections (``passes/elastic_mlp.py``) read it.

It is per thread (a :class:`~elastic_compile.state.PerThread`): a gate sets it around its own block call, and a
call of the same model in another thread at the same moment reads its own setting, so concurrent calls can run
one block at different widths.
"""
from __future__ import annotations

import torch

from ..state import PerThread


class WidthControl(PerThread):
    """Per-block switch read by its sliced modules (per calling thread).

    ``bucket``: index of the width bucket to run (None = dense). ``unit_masks``: per FFN site, a (B, hidden)
    multiplicative mask applied at the out-projection input (soft widths while training routers).
    """

    def __init__(self):
        self.bucket: int | None = None
        self.unit_masks: dict[int, torch.Tensor] | None = None

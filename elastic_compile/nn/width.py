"""The per-block width switch: the gate sets it, the width-sliced projections (``passes/elastic_mlp.py``) read it."""
from __future__ import annotations

import torch


class WidthControl:
    """Per-block switch read by its sliced modules.

    ``bucket``: index of the width bucket to run (None = dense). ``unit_masks``: per FFN site, a (B, hidden)
    multiplicative mask applied at the out-projection input (soft widths while training routers).
    """

    def __init__(self):
        self.bucket: int | None = None
        self.unit_masks: dict[int, torch.Tensor] | None = None

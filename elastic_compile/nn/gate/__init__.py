"""The block gate installed as each block's forward, and the modes it runs in, one module each.

:mod:`.block` is the gate and picks the mode; :mod:`.host` routes on the host (inference), :mod:`.device` on the
device (``device_routing``), :mod:`.soft` trains with straight-through decisions, :mod:`.profile` counts FLOPs per
width bucket (``flop_table``); :mod:`.decisions` turns router logits into decisions for all of them.
"""
from .block import BlockGate

__all__ = ["BlockGate"]

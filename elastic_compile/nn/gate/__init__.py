"""The block gate installed as each block's forward, and the modes it runs in.

:mod:`.block` is the gate; :mod:`.decisions` turns router logits into decisions; :mod:`.device` routes on the
device (``device_routing``); :mod:`.profile` counts FLOPs per width bucket (``flop_table``).
"""
from .block import BlockGate

__all__ = ["BlockGate"]

"""Modules the rewrite installs: routers (:mod:`.router`), width-sliced projections (:mod:`.sliced`) and the block
gate with its modes (:mod:`.gate`)."""
from .router import Router

__all__ = ["Router"]

"""Modules the rewrite installs: routers, width-sliced projections, the block gate."""
from .router import Router

__all__ = ["Router"]

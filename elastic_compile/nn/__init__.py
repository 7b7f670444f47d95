"""What the rewrite installs in a model: routers (:mod:`.router`), the per-block width switch the sliced
projections read (:mod:`.width`) and the block gate with its modes (:mod:`.gate`)."""
from .router import Router

__all__ = ["Router"]

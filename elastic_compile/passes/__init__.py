"""Rewrite passes, one per file, each stating what it matches, what it installs and what it guarantees:
order_neurons -> elastic_mlp -> insert_routers -> gate_blocks (:mod:`.pipeline` runs the last three in order)."""
from .elastic_mlp import make_mlps_elastic, remove_elastic_mlps
from .gate_blocks import gate_block, install_root_hook
from .insert_routers import insert_router
from .order_neurons import apply_unit_permutation, order_neurons, unit_importance
from .pipeline import drop_widths, install, leave_dense

__all__ = ["apply_unit_permutation", "drop_widths", "gate_block", "insert_router", "install", "install_root_hook",
           "leave_dense", "make_mlps_elastic", "order_neurons", "remove_elastic_mlps", "unit_importance"]

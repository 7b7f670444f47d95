"""Rewrite passes, one per file: order_neurons -> elastic_mlp -> insert_routers -> gate_blocks."""
from .elastic_mlp import make_mlps_elastic
from .gate_blocks import gate_block, install_root_hook
from .insert_routers import insert_router
from .order_neurons import apply_unit_permutation, order_neurons, unit_importance

__all__ = ["apply_unit_permutation", "gate_block", "insert_router", "install_root_hook", "make_mlps_elastic",
           "order_neurons", "unit_importance"]

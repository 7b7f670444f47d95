"""The passes in order on blocks whose FFN units are already ordered (``order_neurons``, or the permutations an
artifact stores): what ``transform`` and ``load`` run, and how ``transform`` takes back the widths of a block that
fails verification (``drop_widths``), or all capabilities of one (``leave_dense``).

Per block: elastic_mlp (sliced projections reading a fresh ``WidthControl``), insert_routers (a router when the
block has a decision to make), gate_blocks (the gate as its forward); then the model's root hook and state.
"""
from __future__ import annotations

from torch import nn

from ..analysis.spec import BlockSpec
from ..nn.width import WidthControl
from ..state import ROUTER_ATTRIBUTE, STATE_ATTRIBUTE, ElasticState, gate_of
from .elastic_mlp import make_mlps_elastic, remove_elastic_mlps
from .gate_blocks import gate_block, install_root_hook
from .insert_routers import insert_router


def install(model: nn.Module, state: ElasticState, blocks: list[nn.Module], permutations: dict) -> None:
    """Run elastic_mlp, insert_routers and gate_blocks on ``blocks`` (in ``state.specs`` order) and make
    ``model`` elastic with ``state``."""
    state.permutations = permutations
    state.controls = {}
    for spec, block in zip(state.specs, blocks):
        control = WidthControl()
        make_mlps_elastic(block, spec, control, state.config.width_buckets)
        router = insert_router(block, spec, state.config)
        if router is not None:
            state.routers[spec.index] = router
        state.controls[spec.index] = control
        gate_block(block, spec, router, control, state)
    state.blocks = blocks
    state.root_hook = install_root_hook(model, state)
    setattr(model, STATE_ATTRIBUTE, state)


def drop_widths(block: nn.Module, spec: BlockSpec, state: ElasticState, reason: str) -> None:
    """Run ``block``'s FFNs dense from now on: sliced forwards removed, a skip-only router (or none) in place of
    its router, in the block, the state and the gate."""
    remove_elastic_mlps(block, spec, reason)
    router = insert_router(block, spec, state.config) if (spec.skippable and state.config.allow_skip) else None
    if router is None and hasattr(block, ROUTER_ATTRIBUTE):
        delattr(block, ROUTER_ATTRIBUTE)
    state.routers.pop(spec.index, None)
    if router is not None:
        state.routers[spec.index] = router
    gate_of(block).router = router


def leave_dense(block: nn.Module, spec: BlockSpec, state: ElasticState, reason: str) -> None:
    """Take every capability from ``block``: dense FFNs, no router, never skipped (its gate then always calls the
    block's own forward), with ``reason`` in its notes."""
    if spec.sites:
        remove_elastic_mlps(block, spec, reason)
    spec.skippable = False
    spec.notes.append(f"left dense: {reason}")
    if hasattr(block, ROUTER_ATTRIBUTE):
        delattr(block, ROUTER_ATTRIBUTE)
    state.routers.pop(spec.index, None)
    gate_of(block).router = None

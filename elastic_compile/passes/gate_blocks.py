"""Pass: replace each block's forward by its gate, and hook the model root to start a record per forward.

Matches: every block of the analysis (skippable or not: a gate also applies ``force`` and records decisions).
Installs: a :class:`~elastic_compile.nn.gate.BlockGate` as the block's instance-level ``forward`` (read back with
``elastic_compile.state.gate_of``), and a forward pre-hook on the model that starts each forward's record.

Guarantee: the model keeps its class, forward signature and return type; with every router at full capacity
(or ``force(skip=False, width=1.0)``) each gate calls the original forward unchanged.
"""
from __future__ import annotations

from torch import nn

from ..analysis.spec import BlockSpec
from ..nn.gate import BlockGate
from ..nn.router import Router
from ..nn.width import WidthControl
from ..state import GATE_ATTRIBUTE, ElasticState, state_of


def gate_block(block: nn.Module, spec: BlockSpec, router: Router | None, control: WidthControl,
               state: ElasticState) -> BlockGate:
    gate = BlockGate(block, spec, router, control, state, block.forward)
    block.forward = gate
    setattr(block, GATE_ATTRIBUTE, gate)
    return gate


def install_root_hook(model: nn.Module, state: ElasticState):
    return model.register_forward_pre_hook(_begin_forward, with_kwargs=True)


def _begin_forward(module, args, kwargs):
    # the state is looked up on the module called, not captured: a deep copy of the model (which shares hook
    # functions with the original) must start forwards on its own state
    state_of(module).begin_forward(args, kwargs)

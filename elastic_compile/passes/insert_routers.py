"""Pass: give a block a router sized to stay within the parameter budget, initialised to full capacity.

Matches: blocks with a decision to make (skippable with ``allow_skip``, or with an elastic FFN).
Installs: a :class:`~elastic_compile.nn.router.Router` as the block's submodule ``elastic_router`` (so its weights
live in the model's state dict), reading the inputs the analysis chose (token streams, conditioning).
Guarantee: at most ``router_param_budget`` of the block's parameters (never below ``router_min_hidden`` units),
and an untrained router runs every sample at full width, so the model still computes the dense function. A block
whose streams have no batch axis (``spec.batch_axis`` false) gets a :class:`~elastic_compile.nn.call_router.
CallRouter`: one decision per call.
"""
from __future__ import annotations

from torch import nn

from ..analysis.spec import BlockSpec
from ..config import ElasticConfig
from ..nn.call_router import CallRouter
from ..nn.router import Router, router_hidden_size
from ..state import ROUTER_ATTRIBUTE


def block_parameter_count(block: nn.Module) -> int:
    return sum(p.numel() for n, p in block.named_parameters() if not n.startswith(ROUTER_ATTRIBUTE + "."))


def insert_router(block: nn.Module, spec: BlockSpec, config: ElasticConfig) -> Router | None:
    """Attach ``block.elastic_router`` when the block has a decision to make (skip and/or width); else None."""
    can_skip = spec.skippable and config.allow_skip
    if not can_skip and not spec.elastic_width:
        spec.notes.append("no router: the block can neither be skipped nor narrowed")
        return None
    num_widths = len(config.width_buckets) if spec.elastic_width else 1
    # a choice among skip actions only where there is more than one and the block can be skipped
    num_actions = len(config.skip_actions) if can_skip and len(config.skip_actions) > 1 else 0
    hidden = router_hidden_size(spec.features, num_widths + num_actions, block_parameter_count(block),
                                config.router_hidden, config.router_min_hidden, config.router_param_budget)
    parameter = next(block.parameters())
    kind = Router if spec.batch_axis else CallRouter
    router = kind(spec.features, hidden, num_widths, num_actions).to(device=parameter.device)
    setattr(block, ROUTER_ATTRIBUTE, router)
    return router

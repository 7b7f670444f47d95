"""``report(model)``: what the transform found and did, per block, and the model fingerprint used by save/load."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ConfigError
from .passes.insert_routers import block_parameter_count
from .state import ROUTER_ATTRIBUTE, state_of


def check_materialized(model: nn.Module) -> None:
    """ConfigError when a parameter or buffer has no data (the meta device): nothing could run or be hashed."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise ConfigError("a model whose weights are loaded", f"{name} on the meta device",
                              "Load the weights first (e.g. from_pretrained, or to_empty() and load_state_dict()).")


def model_fingerprint(model: nn.Module, samples: int = 4096, *, ordered: bool = True) -> str:
    """A cheap, stable hash of a model's parameter names, shapes, dtypes and a strided sample of values.

    Router parameters are excluded. ``transform`` records the fingerprint of the base weights *before* neuron
    ordering and ``load`` compares it with the fresh base model's (also unpermuted). The values are hashed in
    their order, so a model whose FFN units were reordered has another fingerprint (``load`` tells a base that
    is already in an artifact's order from one that is not). ``ordered=False``: the fingerprint artifacts
    written before that recorded (sorted values, blind to the order of small tensors). A model without data
    (the meta device) is a ConfigError: ``transform`` and ``load`` both start here.
    """
    check_materialized(model)
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        if f"{ROUTER_ATTRIBUTE}." in name:
            continue
        flat = param.detach().reshape(-1)
        stride = max(1, flat.numel() // samples)
        values = flat[::stride][:samples].float().cpu()
        if not ordered:
            values = values.sort().values
        digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class BlockReport:
    index: int
    path: str
    class_name: str
    skippable: bool
    ffn_sites: list[str]
    router_hidden: int
    router_params: int
    block_params: int
    notes: list[str]

    @property
    def router_param_fraction(self) -> float:
        return self.router_params / max(1, self.block_params)


@dataclass
class TransformReport:
    blocks: list[BlockReport]
    width_buckets: tuple[float, ...]
    #: modules that look like transformer blocks but were left dense (not in ``blocks``), and why
    left_dense: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{len(self.blocks)} blocks, width buckets {list(self.width_buckets)}",
                 f"{'#':>3}  {'block':<34} {'skip':<5} {'elastic FFNs':<40} router"]
        for b in self.blocks:
            sites = ", ".join(b.ffn_sites) or "-"
            router = f"{b.router_params} params ({100 * b.router_param_fraction:.2f}%)" if b.router_params else "none"
            lines.append(f"{b.index:>3}  {b.path:<34} {'yes' if b.skippable else 'no':<5} {sites:<40} {router}")
            lines.extend(f"       note: {note}" for note in b.notes)
        lines.extend(f"  -  {path}: {reason}" for path, reason in sorted(self.left_dense.items()))
        return "\n".join(lines)


def report(model: nn.Module) -> TransformReport:
    """Per-block summary of an elastic model: skippability, elastic FFN sites, router size, notes."""
    state = state_of(model)
    blocks = []
    for spec, block in zip(state.specs, state.blocks):
        router = state.routers.get(spec.index)
        blocks.append(BlockReport(
            index=spec.index, path=spec.path, class_name=spec.class_name, skippable=spec.skippable,
            ffn_sites=[f"{s.name} ({s.hidden} units, {s.activation})" for s in spec.sites],
            router_hidden=router.fc1.out_features if router is not None else 0,
            router_params=sum(p.numel() for p in router.parameters()) if router is not None else 0,
            block_params=block_parameter_count(block), notes=list(spec.notes)))
    return TransformReport(blocks, state.config.width_buckets, dict(getattr(state, "left_dense", {}) or {}))


def router_parameters(model: nn.Module) -> list[torch.nn.Parameter]:
    return [p for router in state_of(model).routers.values() for p in router.parameters()]

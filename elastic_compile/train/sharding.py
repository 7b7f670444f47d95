"""``train_routers(shard_base=True)``: the frozen base sharded across ranks with FSDP2, routers replicated.

Under DistributedDataParallel every rank holds the whole base. Here each elastic block (every module carrying a
gate), then the model root, goes through ``torch.distributed.fsdp.fully_shard``: between uses each rank keeps
1/world of the base weights (a ``DTensor`` shard); a block's weights are all-gathered by the FSDP pre-forward hook
of the block's ``__call__`` and freed after its forward, and again around its backward.

Why the gates are safe: a gate replaces ``block.forward`` on the instance, so the parent's ``block(...)`` still
goes through ``nn.Module.__call__`` and runs FSDP's hooks before the gate; the gate's calls of the block's
original forward (and of its sliced FFN projections, and the recomputation of activation checkpointing, which
runs after the FSDP pre-backward hook of the block's output) all happen while the block's weights are gathered.
What a model calls of a block from outside the block's call (diffusers' DiT: ``transformer_blocks[0].norm1.emb``
from the root's forward) would find its weights sharded: one dense forward before sharding finds such submodules
(:func:`called_outside_their_block`) and each is sharded on its own, so its own ``__call__`` gathers it.

The routers are left out of sharding (``ignored_params``): they stay ordinary replicated parameters, and
:meth:`ShardedBase.average_gradients` all-reduces their gradients after backward to the mean over ranks, as DDP
does, so the routers train exactly as under DDP. The base is frozen (``train_base`` is refused with it).

FLOP tables (``stats``, the budget term) are measured on the whole model before sharding. :meth:`ShardedBase.gathered`
lets rank 0 write an ``ec.save`` checkpoint mid-run (the artifact's fingerprints read the whole base) from
gathered copies; :meth:`ShardedBase.release` undoes the sharding at the end of training (full weights gathered
back, FSDP's hooks, state and classes removed: torch 2.13 FSDP2 internals), so the model leaves
``train_routers`` as it came in: a plain module holding its whole base, as it was handed in on every rank.
"""
from __future__ import annotations

import itertools
from typing import Callable

import torch
from torch import distributed as dist
from torch import nn

from ..state import GATE_ATTRIBUTE, force, state_of


def gated_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules carrying an elastic gate, innermost first (FSDP2 shards children before their parents)."""
    return [m for m in reversed(list(model.modules())) if GATE_ATTRIBUTE in m.__dict__]


def called_outside_their_block(model: nn.Module, probe: Callable[[], None]) -> set[nn.Module]:
    """The submodules of gated blocks that ``probe`` (a forward of the whole model) calls while their block is
    not running, e.g. diffusers' DiT computing its final conditioning with ``transformer_blocks[0].norm1.emb``
    from the model's own forward: FSDP gathers a block's weights only around the block's call."""
    blocks = gated_blocks(model)
    owner: dict[nn.Module, nn.Module] = {}
    for block in blocks:   # innermost first: a submodule belongs to its innermost block
        for sub in block.modules():
            if sub is not block:
                owner.setdefault(sub, block)
    running: list[nn.Module] = []
    outside: set[nn.Module] = set()

    def enter(block, args):
        running.append(block)

    def leave(block, args, output):
        running.remove(block)

    def called(sub, args):
        if owner[sub] not in running:
            outside.add(sub)
    handles = [b.register_forward_pre_hook(enter) for b in blocks]
    handles += [b.register_forward_hook(leave, always_call=True) for b in blocks]
    handles += [sub.register_forward_pre_hook(called) for sub in owner]
    try:
        probe()
    finally:
        for handle in handles:
            handle.remove()
    return outside


class ShardedBase:
    """The FSDP2 sharding of one model's frozen base for the length of one training run.

    ``probe`` runs the whole model once before sharding (every block dense), to find the submodules of blocks
    called from outside them (:func:`called_outside_their_block`): each is sharded on its own, so its own call
    gathers its weights wherever it happens. Then each gated block, then the root."""

    def __init__(self, model: nn.Module, world: int, probe: Callable[[], None]):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        state = state_of(model)
        self.model = model
        self.routers = [p for r in state.routers.values() for p in r.parameters()]
        with torch.no_grad(), force(model, skip=False, width=1.0):
            outside = called_outside_their_block(model, probe)
        chosen = outside | set(gated_blocks(model)) | {model}
        self.modules = [m for m in reversed(list(model.modules())) if m in chosen]   # children before parents
        mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
        for module in self.modules:
            fully_shard(module, mesh=mesh, ignored_params=set(self.routers))
        self.world = world

    def average_gradients(self) -> None:
        """Replace each router gradient by its mean over ranks (one all-reduce; DDP's averaged gradient). A router
        no rank gave a gradient keeps None (Adam leaves it alone); one some ranks did not reach counts zero there."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.routers]
        reached = torch.tensor([float(p.grad is not None) for p in self.routers], device=grads[0].device)
        flat = torch.cat([g.detach().reshape(-1) for g in grads] + [reached])
        dist.all_reduce(flat)
        offset = 0
        for p, anywhere in zip(self.routers, flat[-len(self.routers):].tolist()):
            n = p.numel()
            p.grad = (flat[offset:offset + n] / self.world).view_as(p) if anywhere else None
            offset += n

    def _swap_in_whole(self) -> list[tuple[nn.Module, str, nn.Parameter]]:
        """Put a plain parameter holding the whole weight (all-gathered: every rank calls it) in place of each
        sharded one; returns ``(owner, name, sharded parameter)`` of what was swapped out. The copies are the
        model's own: FSDP's gathering buffers are never handed out (a reader such as ``.numpy()`` in the
        artifact's fingerprint would pin their storage, which FSDP frees after each use)."""
        from torch.distributed.tensor import DTensor

        for module in self.modules:
            module.reshard()   # the root keeps its weights gathered after a forward: every weight a DTensor now
        whole: dict[int, nn.Parameter] = {}
        swapped = []
        for _, owner in self.model.named_modules(remove_duplicate=False):
            for name, param in list(owner._parameters.items()):
                if isinstance(param, DTensor):
                    if id(param) not in whole:
                        whole[id(param)] = nn.Parameter(param.full_tensor().detach().clone(),
                                                        requires_grad=param.requires_grad)
                    owner._parameters[name] = whole[id(param)]
                    swapped.append((owner, name, param))
        return swapped

    def gathered(self, on_rank_0: Callable[[], None]) -> None:
        """Run ``on_rank_0`` (an ``ec.save`` checkpoint: it reads the whole base and the model's class) on the whole
        model with its own class, then go back to the shards (every rank calls it)."""
        fsdp_class = type(self.model)
        swapped = self._swap_in_whole()
        try:
            if dist.get_rank() == 0:
                self.model.__class__ = fsdp_class.__bases__[1]
                on_rank_0()
        finally:
            self.model.__class__ = fsdp_class
            for owner, name, param in swapped:
                owner._parameters[name] = param

    def release(self) -> None:
        """Gather every base weight back into a plain parameter and remove FSDP from the model (every rank)."""
        from torch.distributed._composable.contract import REGISTRY_KEY, STATE_KEY
        from torch.distributed._composable_state import _module_state_mapping
        from torch.distributed.fsdp import fully_shard

        self._swap_in_whole()
        for module in self.modules:
            fsdp_state = fully_shard.state(module)
            group = fsdp_state._fsdp_param_group
            handles = [fsdp_state._pre_forward_hook_handle, fsdp_state._post_forward_hook_handle]
            if group is not None:
                handles += [p._post_load_hook_handle for p in group.fsdp_params]
                handles += list(group._module_to_pre_save_state_dict_hook_handle.values())
                handles += list(group._module_to_pre_load_state_dict_hook_handle.values())
            for handle in handles:
                handle.remove()
        for module in self.modules:
            module.__class__ = type(module).__bases__[1]   # FSDP<Class>(FSDPModule, Class)
            for key in (STATE_KEY, REGISTRY_KEY):
                module.__dict__.pop(key, None)
            _module_state_mapping.pop(module, None)   # else a later fully_shard of it is refused
        for module in self.model.modules():
            module.__dict__.pop("_is_fsdp_managed_module", None)
            module.__dict__.pop("_fsdp_use_orig_params", None)


def first_batch_probe(model: nn.Module, batches):
    """``(batches unchanged, probe)``: the probe runs the model on the first batch's inputs, after measuring their
    FLOP table on the whole model (before sharding, so a run's tables never go through FSDP's hooks)."""
    from ..nn.gate.profile import flop_table
    from ..state import describe_inputs
    from .trajectories import TEACHER_KEY

    first = next(batches)
    inputs = {k: v for k, v in first[0].items() if k != TEACHER_KEY}
    flop_table(model, state_of(model), describe_inputs((), inputs))
    return itertools.chain([first], batches), lambda: model(**inputs)

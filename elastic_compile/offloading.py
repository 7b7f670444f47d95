"""Diffusers' group offloading and the elastic rewrite: offloading goes on after ``transform`` / ``load``, not before.

Why: ``apply_group_offloading`` (``enable_group_offload``) keeps the weights it offloads somewhere the model does
not see: a safetensors file per group (``offload_to_disk_path``) or pinned host copies (streams), both written
when offloading is applied, and it brings them back at each call of the group by assigning ``param.data``.
``transform`` and ``load`` reorder each FFN's neurons in place and add routers inside the blocks, so on a model
already offloaded the next onload would bring back the weights in their old order (a silently wrong model), the
routers would run before their block's weights arrive, and the analysis' shape-only forwards would assign shapes
to the weights. Applied afterwards, offloading sees the elastic model as it is: the routers are part of their
block's group, the hooks wrap the gated forwards, and everything runs as without offloading.

:func:`offloading_paused` lets ``ec.stats``' FLOP profiler run its shape-only forward under the offloading hooks
without moving any weight (``cache/diffusers_protocol.py``'s ``profiling_hooks`` enters it).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .errors import ConfigError


def is_group_offloading_hook(hook) -> bool:
    """Whether a diffusers hook is group offloading's (it holds the group it onloads and offloads)."""
    return hasattr(getattr(hook, "group", None), "onload_")


def offloaded_modules(model: nn.Module) -> list[str]:
    """The names of the modules under ``model`` that carry a group offloading hook ("" for ``model`` itself)."""
    names = []
    for name, module in model.named_modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None and any(is_group_offloading_hook(hook) for hook in registry.hooks.values()):
            names.append(name)
    return names


def refuse_offloaded(model: nn.Module, action: str) -> None:
    """Raise :class:`ConfigError` when ``model`` is under group offloading (``action``: what would rewrite it)."""
    names = offloaded_modules(model)
    if names:
        shown = ", ".join(repr(name) for name in names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ConfigError(f"a model without diffusers' group offloading for {action}",
                          f"group offloading hooks on {len(names)} modules ({shown})",
                          f"Run {action} on the model first, then apply group offloading "
                          "(apply_group_offloading / enable_group_offload / pipe.enable_group_offload) to the "
                          "elastic model; or load the model again without offloading.")


@contextlib.contextmanager
def offloading_paused(model: nn.Module, hooks: list):
    """Within (a forward under ``FakeTensorMode``): diffusers' group offloading hooks under ``model`` only move the
    call's arguments to their onload device, and every parameter or buffer of a group that is not on its onload
    device is lent as a shape-only tensor there. Why: the hooks onload and offload by assigning ``param.data``, and a
    tensor made under ``FakeTensorMode`` has no data, so the real weights would be replaced by shapes. The
    parameters themselves are left as they are (offloaded ones stay offloaded)."""
    groups = [hook for hook in hooks if is_group_offloading_hook(hook) and getattr(hook, "fn_ref", None) is not None]
    if not groups:
        yield
        return
    devices: dict[int, object] = {}
    for hook in groups:
        group = hook.group
        tensors = [*group.parameters, *group.buffers]
        for module in group.modules:
            tensors += [*module.parameters(), *module.buffers()]
        devices.update((id(tensor), group.onload_device) for tensor in tensors)
    lent = []
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                device = devices.get(id(tensor))
                if tensor is not None and device is not None and tensor.device != torch.device(device):
                    lent.append((table, name, tensor))
                    table[name] = torch.empty_like(tensor, device=device)  # a FakeTensor: no memory
    replaced = [(hook.fn_ref, hook.fn_ref.pre_forward, hook.fn_ref.post_forward) for hook in groups]
    for hook in groups:
        kept = getattr(getattr(hook, "config", None), "exclude_kwargs", None) or ()
        hook.fn_ref.pre_forward, hook.fn_ref.post_forward = _arguments_to(hook.group.onload_device, kept), _unchanged
    try:
        yield
    finally:
        for fn_ref, pre_forward, post_forward in replaced:
            fn_ref.pre_forward, fn_ref.post_forward = pre_forward, post_forward
        for table, name, tensor in lent:
            table[name] = tensor


def _arguments_to(device, kept=()):
    """A hook's ``pre_forward`` that moves the call's tensors to ``device`` and does nothing else (keyword
    arguments named in ``kept`` pass as they are: the hook's ``exclude_kwargs``, objects updated in place)."""

    def move(value):
        return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, value)

    def pre_forward(module, *args, **kwargs):
        return move(args), {key: value if key in kept else move(value) for key, value in kwargs.items()}

    return pre_forward


def _unchanged(module, output):
    return output

"""Last capture fallback for a block: export it with the submodules that no exporter can trace kept opaque.

Some blocks hold one part whose eager code leaves the tensor world (HiDream's MoE feed-forward counts tokens per
expert with ``.cpu().numpy()``), so neither torch.export nor draft_export captures the block, although the rest
of it (attention, norms, the residual adds) is ordinary. Here the innermost submodules whose own export fails
are found (only failing modules are searched further down), and while the block is exported each of them is
replaced by one call of the custom op ``elastic_compile::opaque_submodule(tensors, key) -> tensors``. Its fake
implementation returns tensors shaped like the recorded outputs (the graph is specialised to the example's
sizes, as with draft_export); its real implementation runs the live submodule eagerly, so the analyses can still
evaluate the graph. An opaque part is never an elastic FFN site (the analyses see one node), so a block whose
FFN is opaque becomes skip-only.

Guarantee: the submodules' forwards are restored when the export ends, also when it fails. The op holds only a
weak reference to each submodule.
"""
from __future__ import annotations

import contextlib
import itertools
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .record import record_calls

#: key -> (weak submodule, non-tensor leaves and structure of its call, structure of its output)
_REGISTRY: dict[int, tuple[weakref.ref, list, pytree.TreeSpec, pytree.TreeSpec, list]] = {}
_KEYS = itertools.count()
_LOCK = threading.Lock()


@torch.library.custom_op("elastic_compile::opaque_submodule", mutates_args=())
def opaque_submodule(tensors: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    module_ref, leaves, in_spec, out_spec, _ = _REGISTRY[key]
    module = module_ref()
    if module is None:
        raise RuntimeError("elastic_compile::opaque_submodule: its submodule no longer exists")
    values = iter(tensors)
    args, kwargs = pytree.tree_unflatten([next(values) if leaf is _TENSOR else leaf for leaf in leaves], in_spec)
    with torch.no_grad():
        output = module(*args, **kwargs)
    # outputs of a custom op may not alias its inputs
    return [t.clone() for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]


@opaque_submodule.register_fake
def _opaque_submodule_fake(tensors, key):
    return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype, device in _REGISTRY[key][4]]


class _TensorSlot:
    """Marks where a tensor goes in a recorded call's flattened leaves."""


_TENSOR = _TensorSlot()


def _register(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> int:
    leaves, in_spec = pytree.tree_flatten((args, kwargs))
    out_leaves, out_spec = pytree.tree_flatten(output)
    meta = [(tuple(t.shape), t.dtype, t.device) for t in out_leaves if isinstance(t, torch.Tensor)]
    with _LOCK:
        key = next(_KEYS)
        _REGISTRY[key] = (weakref.ref(module), [_TENSOR if isinstance(x, torch.Tensor) else x for x in leaves],
                          in_spec, out_spec, meta)
    return key


def _opaque_forward(key: int, output: Any) -> Callable:
    out_leaves, out_spec = pytree.tree_flatten(output)

    def forward(*args, **kwargs):
        tensors = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        results = iter(torch.ops.elastic_compile.opaque_submodule(tensors, key))
        return pytree.tree_unflatten([next(results) if isinstance(x, torch.Tensor) else x for x in out_leaves],
                                     out_spec)
    return forward


def untraceable_submodules(block: nn.Module, args: tuple, kwargs: dict,
                           exports: Callable[[nn.Module, tuple, dict], bool]) -> dict[str, Any]:
    """The innermost submodules of ``block`` (name -> recorded call) that ``exports`` cannot capture on their
    recorded call; a failing submodule is replaced by the failing ones among its children, when there are any."""
    found: dict[str, Any] = {}

    def search(module: nn.Module, m_args: tuple, m_kwargs: dict, prefix: str) -> bool:
        children = {f"{prefix}{n}": c for n, c in module.named_children() if any(True for _ in c.parameters())}
        if not children:
            return False
        def run_once():  # record_calls calls its model with the (empty) keyword inputs
            return module(*m_args, **m_kwargs)
        calls, _ = record_calls(run_once, {}, {n[len(prefix):]: c for n, c in children.items()})
        failing = False
        for name, call in calls.items():
            if exports(call.module, call.args, call.kwargs):
                continue
            failing = True
            if not search(call.module, call.args, call.kwargs, f"{prefix}{name}."):
                found[f"{prefix}{name}"] = call
        return failing
    search(block, args, kwargs, "")
    return found


@contextlib.contextmanager
def submodules_as_opaque_calls(calls: dict[str, Any]):
    """While inside, each recorded submodule call of ``calls`` runs as one ``opaque_submodule`` op."""
    saved = []
    try:
        for call in calls.values():
            key = _register(call.module, call.args, call.kwargs, call.output)
            saved.append((call.module, call.module.__dict__.get("forward")))
            call.module.forward = _opaque_forward(key, call.output)
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward

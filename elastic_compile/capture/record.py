"""Record the real inputs and outputs of chosen submodules during one forward of the model."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CaptureError


def call_arguments(inputs: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` of example ``inputs``: a dict (keyword arguments), a tuple/list (positional) or one
    tensor."""
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_model(model: nn.Module, inputs: Any):
    """Call ``model`` with ``inputs`` (see :func:`call_arguments`)."""
    args, kwargs = call_arguments(inputs)
    return model(*args, **kwargs)


@dataclass
class ModuleCall:
    """One call of a submodule: its fully qualified name, arguments bound to parameter names, and output."""

    name: str
    module: nn.Module
    order: int
    args: tuple
    kwargs: dict
    output: Any

    def bound_arguments(self) -> dict[str, Any]:
        return bind_arguments(self.module, self.args, self.kwargs)


def bind_arguments(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Map a call's positional and keyword arguments to the names of ``module.forward``'s parameters."""
    return bind_to_signature(inspect.signature(module.forward), args, kwargs)


def bind_to_signature(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments by parameter name. Items of ``*args`` are named ``*0``, ``*1``...; ``**kwargs`` keep their keys;
    a call the signature does not accept falls back to positional names ``*i`` plus the keywords."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {**{f"*{i}": a for i, a in enumerate(args)}, **kwargs}
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"*{i}": v for i, v in enumerate(value)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


class SignatureBinder:
    """:func:`bind_to_signature` for one signature, with a shortcut for the calls a model makes every step.

    ``inspect.Signature.bind`` runs dozens of Python functions; between two block graphs of an exported runtime
    each one costs cache misses (the graph has just streamed its weights through the caches). Calls whose
    positional arguments fit the named positional parameters and whose keywords name ordinary parameters (not
    given twice, every required parameter present) are bound by zipping names; any other call takes
    :func:`bind_to_signature`, so both give the same dict, in the signature's parameter order.
    """

    def __init__(self, signature: inspect.Signature):
        self.signature = signature
        kinds = inspect.Parameter
        params = list(signature.parameters.values())
        self.positional = tuple(p.name for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD))
        self.keywords = frozenset(p.name for p in params if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY))
        self.required = frozenset(p.name for p in params if p.default is kinds.empty
                                  and p.kind not in (kinds.VAR_POSITIONAL, kinds.VAR_KEYWORD))
        self.order = {p.name: i for i, p in enumerate(params)}
        #: (positional count, keyword names) -> (names in signature order, index of each in args + kwargs values)
        self.plans: dict[tuple, tuple[tuple[str, ...], tuple[int, ...]] | None] = {}

    def __call__(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        shape = (len(args), tuple(kwargs))
        plan = self.plans.get(shape, False)
        if plan is False:
            plan = self.plans[shape] = self.plan(*shape)
        if plan is None:
            return bind_to_signature(self.signature, args, kwargs)
        names, picks = plan
        values = (*args, *kwargs.values())
        return dict(zip(names, [values[i] for i in picks]))

    def plan(self, count: int, keywords: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[int, ...]] | None:
        """How a call of this shape binds (see the class docstring), or None where it takes ``bind_to_signature``."""
        if count > len(self.positional):
            return None
        given = list(self.positional[:count]) + list(keywords)
        if (not all(k in self.keywords for k in keywords) or len(set(given)) != len(given)
                or not self.required.issubset(given)):
            return None
        ordered = sorted(range(len(given)), key=lambda i: self.order[given[i]])
        return tuple(given[i] for i in ordered), tuple(ordered)


def record_calls(model: nn.Module, inputs: Any, modules: dict[str, nn.Module]) -> tuple[dict[str, ModuleCall], Any]:
    """Run ``model(inputs)`` once without gradients and record the first call of each module in ``modules``.

    Returns ``(calls by name, model output)``; ``ModuleCall.order`` is the order in which modules ran.
    Hooks are always removed, also when the forward fails.
    """
    calls: dict[str, ModuleCall] = {}
    pending: dict[str, tuple] = {}
    handles = []

    def pre_hook(name):
        def hook(module, args, kwargs):
            if name not in calls and name not in pending:
                pending[name] = (len(pending), args, dict(kwargs))
        return hook

    def post_hook(name):
        def hook(module, args, kwargs, output):
            if name in pending and name not in calls:
                order, a, k = pending[name]
                calls[name] = ModuleCall(name, module, order, a, k, output)
        return hook

    for name, module in modules.items():
        handles.append(module.register_forward_pre_hook(pre_hook(name), with_kwargs=True))
        handles.append(module.register_forward_hook(post_hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            output = call_model(model, inputs)
    except Exception as exc:  # the user's model rejected the inputs: say so with the original error
        raise CaptureError(
            "example_inputs that the model accepts (one real forward call: a dict of keyword arguments or a tuple)",
            f"{type(exc).__name__}: {exc}",
            "Call the model yourself with these inputs to reproduce; pass exactly what the pipeline passes.",
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    return calls, output

"""Where one generation ends and the next begins, read from the timesteps a cache context is called with.

A sampler calls the model once per step (per classifier-free-guidance branch) with timesteps that move one way
through a generation: down for diffusers' schedulers (noise level or ``sigma * 1000`` falling), up for samplers
that count time forward. A call whose timestep moves back against the direction the context's steps took is the
first step of a new generation, and the feature cache starts that context afresh there (``store.py``), so a
forgotten ``reset_cache`` cannot carry one generation's stored updates into the next. Equal timesteps in a row (a
second-order sampler's two calls per step) are no change of direction.

What is not detected: the direction is learned from a context's first two distinct timesteps, so a generation of
a single step followed by another starting at the same timestep is one generation; samplers that share no
timestep convention with this rule still reset with ``reset_cache`` / ``ElasticCacheHooks``.
"""
from __future__ import annotations

import inspect
import numbers

import torch
from torch._subclasses.fake_tensor import FakeTensor

#: Argument names a model's forward takes its timestep by (diffusers' ``timestep``, DiT-style ``t``, ...).
TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas", "noise_level")


class GenerationClock:
    """The last timestep of one cache context and the direction its steps move (0 until two differ)."""

    __slots__ = ("last", "direction")

    def __init__(self):
        self.last: float | None = None
        self.direction = 0

    def advance(self, value: float) -> bool:
        """Record the timestep of a new call; True when it starts a new generation (it moved back)."""
        last, self.last = self.last, value
        if last is None or value == last or value != value:
            return False
        step = 1 if value > last else -1
        if self.direction == 0:
            self.direction = step
            return False
        return step != self.direction


def timestep_argument(model) -> tuple[str, int | None] | None:
    """``(name, position)`` of the timestep among the arguments of ``model``'s forward (position None where it
    cannot be passed positionally), or None when no argument is named like one (:data:`TIMESTEP_NAMES`)."""
    try:
        parameters = list(inspect.signature(type(model).forward).parameters.values())[1:]  # without self
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    for name in TIMESTEP_NAMES:
        for p in parameters:
            if p.name == name and p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL:
                return name, positional.index(name) if name in positional else None
    return None


def timestep_value(args: tuple, kwargs: dict, where: tuple[str, int | None] | None) -> float | None:
    """The largest timestep of a call (one value for the batch), or None when the call has none: the argument
    ``where`` names, else a keyword argument named like a timestep."""
    if where is not None:
        name, position = where
        value = kwargs.get(name)
        if value is None and position is not None and position < len(args):
            value = args[position]
    else:
        value = next((kwargs[name] for name in TIMESTEP_NAMES if name in kwargs), None)
    if isinstance(value, torch.Tensor):
        if (value.numel() == 0 or value.dtype == torch.bool or value.is_complex() or value.is_meta
                or isinstance(value, FakeTensor)):
            return None
        if value.is_cuda and torch.cuda.is_current_stream_capturing():
            return None  # no host copy inside a CUDA-graph capture
        return float(value.detach().max().item()) if value.numel() > 1 else float(value.detach().reshape(()).item())
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    return None

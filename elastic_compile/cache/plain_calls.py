"""Calls outside any cache context, given one from their timestep (per calling thread): the rules are in
``elastic_compile/serving.py``'s docstring, which serves loaded models this way. Installed by ``restore_serving``
and, on diffusers models, by ``apply_feature_cache`` (a pipeline that wraps nothing in ``cache_context``, like
DiTPipeline or PixArtAlphaPipeline, needs no toolkit code)."""
from __future__ import annotations

import threading

from torch import nn

from ..state import state_of
from .context import cache_context, reset_cache
from .generation import timestep_argument, timestep_value

#: The model attribute holding its :class:`PlainCalls` (read by the hooks on the module called).
PLAIN_CALLS_ATTRIBUTE = "_elastic_plain_calls"
#: More calls than this at one timestep are taken as a new generation (bounds the contexts a loop can create).
MAX_BRANCHES = 8


def install_plain_calls(model: nn.Module) -> None:
    """Give ``model``'s calls outside any cache context a context and a reset per generation (idempotent)."""
    if PLAIN_CALLS_ATTRIBUTE in model.__dict__:
        return
    parameter = timestep_argument(model)
    if parameter is None:
        return
    model.__dict__[PLAIN_CALLS_ATTRIBUTE] = PlainCalls(parameter)
    model.register_forward_pre_hook(_enter_plain_call, with_kwargs=True)
    model.register_forward_hook(_exit_plain_call, always_call=True)


class PlainCalls(threading.local):
    """The timestep history of one caller's (thread's) calls outside any cache context: which generation and
    branch each one belongs to. Per thread, like the cache's rows (``cache/store.py``), so concurrent plain loops
    on one model do not read each other's timesteps as branches; a deep copy of the model starts afresh."""

    def __init__(self, parameter: tuple[str, int | None]):
        self.parameter = parameter
        self.last: float | None = None
        self.direction = 0
        self.branch = 0
        self.stack: list = []  # the contexts entered by the pre-hook, exited by the hook

    def __deepcopy__(self, memo):
        return PlainCalls(self.parameter)

    def timestep(self, args: tuple, kwargs: dict) -> float | None:
        return timestep_value(args, kwargs, self.parameter)

    def place(self, t: float) -> tuple[str, bool]:
        """``(context name, whether a new generation starts)`` of a call at timestep ``t``."""
        new = self.last is None
        if not new and t == self.last:
            self.branch += 1
            new = self.branch >= MAX_BRANCHES
        elif not new:
            step = 1 if t > self.last else -1
            new = self.direction not in (0, step)
            self.direction = 0 if new else step
            self.branch = 0
        if new:
            self.direction, self.branch = 0, 0
        self.last = t
        return f"plain-{self.branch}", new


def _enter_plain_call(module, args, kwargs):
    calls = module.__dict__.get(PLAIN_CALLS_ATTRIBUTE)
    state = state_of(module)
    entered = None
    if calls is not None and state.cache is not None and state.cache.context is None and not state.profiling \
            and not state.soft:
        t = calls.timestep(args, kwargs)
        if t is not None:
            name, new = calls.place(t)
            if new:
                reset_cache(module)
            entered = cache_context(module, name)
            entered.__enter__()
    if calls is not None:
        calls.stack.append(entered)


def _exit_plain_call(module, args, output):
    calls = module.__dict__.get(PLAIN_CALLS_ATTRIBUTE)
    if calls is None or not calls.stack:
        return
    entered = calls.stack.pop()
    if entered is not None:
        entered.__exit__(None, None, None)

"""The feature cache on an elastic model, in the style of diffusers' hooks: ``apply_feature_cache`` turns it on,
``cache_context`` names the classifier-free-guidance branch of a call, ``reset_cache`` forgets everything, and
:class:`ElasticCacheHooks` lets the sampling loop do the last two.

Contexts and stored updates are the calling thread's (``store.py``): threads sharing one model each run their own
generations. A new generation also resets its context by itself (``generation.py``). On a diffusers model the cache also
speaks diffusers' own protocol (``model.cache_context(name)``, ``model._reset_stateful_cache()``, calls outside any
context): ``diffusers_protocol.py``."""
from __future__ import annotations

import contextlib

from torch import nn

from ..sampling.hooks import SamplerHooks
from ..state import state_of
from .generation import timestep_argument
from .store import FeatureCacheConfig, FeatureCacheState


def is_diffusers_model(model) -> bool:
    return isinstance(model, nn.Module) and any(cls.__module__.startswith("diffusers.") for cls in type(model).__mro__)


def serving_cache_config(serving: dict) -> FeatureCacheConfig:
    """The cache a model's routers were trained for (``serving["feature_cache"]``), else the default config. A
    recorded cache without ``forecast_min_points`` predates that option: its routers were trained with 1."""
    recorded = serving.get("feature_cache")
    if recorded is None:
        return FeatureCacheConfig()
    return FeatureCacheConfig(**{"forecast_min_points": 1, **recorded})


def apply_feature_cache(model: nn.Module, config: FeatureCacheConfig | None = None) -> FeatureCacheState:
    """Turn the feature cache on for an elastic model (replacing any previous cache state).

    Without ``config``: the cache the routers were trained for (``train_routers(..., cache_aware=True)`` records
    it and ``save``/``load`` keep it), else ``FeatureCacheConfig()``. On a diffusers model the pipeline then drives
    the cache through the model's own ``cache_context`` and ``_reset_stateful_cache`` (``diffusers_protocol.py``),
    and calls outside any context get one from their timestep (``plain_calls.py``)."""
    state = state_of(model)
    base = model if isinstance(model, nn.Module) else getattr(model, "model", model)  # a Runtime's model
    state.cache = FeatureCacheState(config or serving_cache_config(state.serving),
                                    state.config.skip_actions, timestep_argument(base))
    if is_diffusers_model(base):  # speak diffusers' cache protocol: diffusers_protocol.py
        from .diffusers_protocol import install_protocol_hook
        from .plain_calls import install_plain_calls

        # diffusers' CacheMixin: its pipelines call cache_context and the reset (a Runtime has both itself)
        if base is model and hasattr(base, "cache_context"):
            install_protocol_hook(base)
        install_plain_calls(base)  # a Runtime too: as DiTPipeline's transformer its calls name no context
    return state.cache


def serving_cache_hooks(model: nn.Module, mode: str = "auto") -> "ElasticCacheHooks | None":
    """Turn the cache on and return its sampler hooks when ``mode`` is "on", or "auto" and the routers were trained
    for it (``train_routers(..., cache_aware=True)``); None (cache left as it is) otherwise."""
    if mode == "off" or (mode == "auto" and not state_of(model).serving.get("feature_cache")):
        return None
    apply_feature_cache(model)
    return ElasticCacheHooks(model)


def remove_feature_cache(model: nn.Module) -> None:
    """Turn the feature cache off (and, on a diffusers model, remove its hook from the model's registry); calls
    then need no cache context. ``apply_feature_cache`` turns it on again."""
    state_of(model).cache = None
    base = model if isinstance(model, nn.Module) else getattr(model, "model", model)
    if is_diffusers_model(base):
        from .diffusers_protocol import remove_protocol_hook

        remove_protocol_hook(base)


@contextlib.contextmanager
def cache_context(model: nn.Module, name: str):
    """Calls inside (in this thread) use the cache rows of branch ``name`` (like diffusers' ``cache_context``)."""
    cache = state_of(model).cache
    if cache is None:
        yield
        return
    previous, cache.context = cache.context, name
    try:
        yield
    finally:
        cache.context = previous


def reset_cache(model: nn.Module) -> None:
    """Forget the calling thread's cached deltas (at the start of every generation; a new generation is also
    detected by its timesteps)."""
    cache = state_of(model).cache
    if cache is not None:
        cache.reset()


class ElasticCacheHooks(SamplerHooks):
    """Sampler hooks for an elastic model with the feature cache: reset per generation, one context per branch."""

    def __init__(self, model: nn.Module):
        self.model = model

    def start_generation(self) -> None:
        reset_cache(self.model)

    def end_generation(self) -> None:
        reset_cache(self.model)

    @contextlib.contextmanager
    def branch(self, name, step):
        with cache_context(self.model, name):
            yield

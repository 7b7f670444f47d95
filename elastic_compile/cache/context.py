"""The feature cache on an elastic model, in the style of diffusers' hooks: ``apply_feature_cache`` turns it on,
``cache_context`` names the classifier-free-guidance branch of a call, ``reset_cache`` forgets everything, and
:class:`ElasticCacheHooks` lets the sampling loop do the last two.

Contexts and stored updates are the calling thread's (``store.py``): threads sharing one model each run their own
generations. A new generation also resets its context by itself (``generation.py``), and so does a diffusers
pipeline's ``_reset_stateful_cache()`` (called at the end of every pipeline call) on a model that has it."""
from __future__ import annotations

import contextlib

from torch import nn

from ..sampling.hooks import SamplerHooks
from ..state import state_of
from .generation import timestep_argument
from .store import FeatureCacheConfig, FeatureCacheState


def apply_feature_cache(model: nn.Module, config: FeatureCacheConfig | None = None) -> FeatureCacheState:
    """Turn the feature cache on for an elastic model (replacing any previous cache state).

    Without ``config``: the cache the routers were trained for (``train_routers(..., cache_aware=True)`` records
    it and ``save``/``load`` keep it), else ``FeatureCacheConfig()``."""
    state = state_of(model)
    base = model if isinstance(model, nn.Module) else getattr(model, "model", model)  # a Runtime's model
    state.cache = FeatureCacheState(config or FeatureCacheConfig(**state.serving.get("feature_cache", {})),
                                    state.config.skip_actions, timestep_argument(base))
    _chain_stateful_reset(base)
    return state.cache


class StatefulCacheReset:
    """Installed as a diffusers model's ``_reset_stateful_cache`` (the pipelines' reset of stateful hooks, called
    at the end of every pipeline call): runs the model's own, then :func:`reset_cache`."""

    def __init__(self, model: nn.Module, original):
        self.model = model
        self.original = original

    def __call__(self, *args, **kwargs):
        result = self.original(*args, **kwargs)
        reset_cache(self.model)
        return result


def _chain_stateful_reset(model) -> None:
    original = getattr(model, "_reset_stateful_cache", None)
    if callable(original) and not isinstance(original, StatefulCacheReset):
        model._reset_stateful_cache = StatefulCacheReset(model, original)


def serving_cache_hooks(model: nn.Module, mode: str = "auto") -> "ElasticCacheHooks | None":
    """Turn the cache on and return its sampler hooks when ``mode`` is "on", or "auto" and the routers were trained
    for it (``train_routers(..., cache_aware=True)``); None (cache left as it is) otherwise."""
    if mode == "off" or (mode == "auto" and not state_of(model).serving.get("feature_cache")):
        return None
    apply_feature_cache(model)
    return ElasticCacheHooks(model)


def remove_feature_cache(model: nn.Module) -> None:
    state_of(model).cache = None


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

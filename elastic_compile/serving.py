"""Serve a loaded elastic model the way its routers were trained: ``restore_serving`` puts the recorded feature
cache back on, and lets a plain sampling loop (no ``cache_context``, no ``reset_cache``) use it correctly.

Why: routers trained cache-aware (``train_routers(..., cache_aware=True)``, rollout training) decide "skip" where
the cache serves the block's last update; without the cache the same decisions leave blocks out and samples fall
apart (class accuracy 0.2 instead of 0.99 on the reference model). ``ec.load`` therefore restores the serving an
artifact records (``elastic.json`` ``serving.feature_cache``) unless asked not to.

A plain loop calls the model outside any cache context and never resets the cache. Calls outside a context are
given one by :class:`PlainCalls`, from the call's timestep (a forward parameter named ``timestep``, ``timesteps``,
``t``, ``sigma``, ``sigmas`` or ``noise_level``: ``cache/generation.py``), per calling thread:

* timesteps moving one way (down for diffusers' schedulers, or up) are the steps of one generation;
* a call at the timestep of the call before is another branch of the same step (classifier-free guidance as two
  calls): branch ``k`` of a step uses context ``"plain-k"``, so the branches' cached updates stay apart;
* a timestep moving against the generation's direction (the next generation starting) resets the cache.

Calls inside a context (``cache_context``, :class:`~elastic_compile.cache.ElasticCacheHooks`, a sampler's hooks)
are left alone, and so are models without a timestep parameter: those still need a context (the cache raises
CacheContextError without one). A generation of a single step followed by another at the same timestep reads as
two branches of one step (each branch starts with an empty cache, so nothing stale is reused).
"""
from __future__ import annotations

from torch import nn

from .cache import apply_feature_cache
from .cache.plain_calls import MAX_BRANCHES, PLAIN_CALLS_ATTRIBUTE, PlainCalls, install_plain_calls
from .state import state_of

__all__ = ["MAX_BRANCHES", "PLAIN_CALLS_ATTRIBUTE", "PlainCalls", "install_plain_calls", "restore_serving"]


def restore_serving(model: nn.Module) -> bool:
    """Turn on the feature cache the model's routers were trained for (``state.serving``) and let calls outside a
    cache context use it (see the module docstring). Returns whether a cache was restored."""
    if not state_of(model).serving.get("feature_cache"):
        return False
    apply_feature_cache(model)
    install_plain_calls(model)
    return True

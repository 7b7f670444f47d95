"""Block-level feature cache (training-free): skipped blocks reuse the residual update of their last run.

:mod:`.store` holds the configuration and the stored updates, :mod:`.context` turns the cache on for a model and
scopes its calls (:mod:`.diffusers_protocol`: through a diffusers model's own ``cache_context`` and
``_reset_stateful_cache``; :mod:`.plain_calls`: calls outside any context), :mod:`.rules` states once which samples run, reuse or are left out; the gates (``nn/gate``)
apply them.
"""
from .context import (ElasticCacheHooks, apply_feature_cache, cache_context, remove_feature_cache, reset_cache,
                      serving_cache_hooks)
from .store import CacheContextError, DeviceEntry, FeatureCacheConfig, FeatureCacheState, HostEntry

__all__ = ["CacheContextError", "DeviceEntry", "ElasticCacheHooks", "FeatureCacheConfig", "FeatureCacheState",
           "HostEntry", "apply_feature_cache", "cache_context", "remove_feature_cache", "reset_cache",
           "serving_cache_hooks"]

"""Block-level feature cache (training-free): skipped blocks reuse the residual update of their last run.

:mod:`.store` holds the configuration and the stored updates, :mod:`.context` turns the cache on for a model and
scopes its calls; the gates (``nn/gate``) apply the cache's rules.
"""
from .context import (ElasticCacheHooks, apply_feature_cache, cache_context, remove_feature_cache, reset_cache,
                      serving_cache_hooks)
from .store import CacheContextError, DeviceEntry, FeatureCacheConfig, FeatureCacheState

__all__ = ["CacheContextError", "DeviceEntry", "ElasticCacheHooks", "FeatureCacheConfig", "FeatureCacheState",
           "apply_feature_cache", "cache_context", "remove_feature_cache", "reset_cache", "serving_cache_hooks"]

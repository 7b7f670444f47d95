"""elastic_compile: make any Diffusion Transformer elastic (E-DiT).

Public API::

    import elastic_compile as ec
    model = ec.transform(model, ec.ElasticConfig(), example_inputs=kwargs)
    with ec.force(model, skip={0, 2}, width=0.5):
        out = model(**kwargs)
    s = ec.stats(model)
    ec.save(model, "artifact/"); model2 = ec.load(fresh_base_model, "artifact/")
"""
from .config import ElasticConfig
from .errors import ElasticCompileError
from .report import report
from .runtime.cache import FeatureCacheConfig, apply_feature_cache, cache_context, reset_cache
from .runtime.state import force
from .runtime.stats import Decision, ElasticStats, stats
from .serialization import load, save
from .train import train_routers
from .transform import transform

__version__ = "0.1.0"

__all__ = ["Decision", "ElasticCompileError", "ElasticConfig", "ElasticStats", "FeatureCacheConfig",
           "apply_feature_cache", "cache_context", "force", "load", "report", "reset_cache", "save", "stats",
           "train_routers", "transform"]

from . import runtime  # noqa: E402  (elastic_compile.runtime.load: exported runtimes)
from .export import export  # noqa: E402

__all__ += ["export", "runtime"]

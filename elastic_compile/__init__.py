"""elastic_compile: make any Diffusion Transformer elastic (E-DiT).

Public API::

    import elastic_compile as ec
    model = ec.transform(model, ec.ElasticConfig(), example_inputs=kwargs)
    with ec.force(model, skip={0, 2}, width=0.5):
        out = model(**kwargs)
    s = ec.stats(model)
    ec.save(model, "artifact/"); model2 = ec.load(fresh_base_model, "artifact/")
    ec.export(model, kwargs, "exported/"); runtime = ec.runtime.load("exported/")
"""
from . import runtime
from .cache import FeatureCacheConfig, apply_feature_cache, cache_context, remove_feature_cache, reset_cache
from .capture.pipeline_inputs import capture_inputs
from .config import ElasticConfig
from .deploy import export
from .errors import ElasticCompileError
from .report import report
from .serialization import from_pretrained, load, save
from .state import force
from .stats import Decision, ElasticStats, stats
from .train import train_routers
from .transform import transform
from .version import __version__

__all__ = ["Decision", "ElasticCompileError", "ElasticConfig", "ElasticStats", "FeatureCacheConfig", "__version__",
           "apply_feature_cache", "cache_context", "capture_inputs", "export", "force", "from_pretrained", "load",
           "remove_feature_cache", "report", "reset_cache", "runtime", "save", "stats", "train_routers", "transform"]

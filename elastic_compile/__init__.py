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
from .runtime.state import force
from .runtime.stats import Decision, ElasticStats, stats
from .serialization import load, save
from .transform import transform

__version__ = "0.1.0"

__all__ = ["Decision", "ElasticCompileError", "ElasticConfig", "ElasticStats", "force", "load", "report", "save",
           "stats", "transform"]

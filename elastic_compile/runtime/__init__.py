"""Where the exported runtime used to live, kept so that ``elastic_compile.runtime.load(dir)`` and
``elastic_compile.runtime.capture_cuda_graph(model, inputs)`` keep working: both are :mod:`elastic_compile.serve`'s.

The rest of the former ``runtime`` package moved by job: the feature cache to :mod:`elastic_compile.cache`, the
sampling loop to :mod:`elastic_compile.sampling`, ``stats`` to :mod:`elastic_compile.stats`, ``force`` and the
model state to :mod:`elastic_compile.state`, device routing to :mod:`elastic_compile.nn.gate.device`, and the
artifact loader, backends and CUDA graphs to :mod:`elastic_compile.serve` / :mod:`elastic_compile.backends`.
"""
from ..serve import capture_cuda_graph, load

__all__ = ["capture_cuda_graph", "load"]

"""Execution backends of an exported runtime: each opens a graph file as ``callable(list[Tensor]) -> list[Tensor]``.

``onnxruntime`` (CPU sessions; executed by the tests), ``tensorrt`` (engines from a validated engine cache;
needs TensorRT + CUDA), and the pure-Python engine cache logic in :mod:`.engine_cache`.
"""

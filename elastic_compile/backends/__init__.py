"""Execution backends for exported graphs: each opens a graph file as ``callable(list[Tensor]) -> list[Tensor]``.

The exporter runs them to check what it wrote (and prebuilds TensorRT engines), the runtime (``serve/``) to run
an artifact; so they sit below both.

``onnxruntime`` (CPU sessions; executed by the tests), ``tensorrt`` (engines from a validated engine cache;
needs TensorRT + CUDA), and the pure-Python engine cache logic in :mod:`.engine_cache`.
"""

"""Running elastic models fast: exported artifacts (:func:`load`: a :class:`~.loader.Runtime` that executes the
block graphs in ONNX Runtime or TensorRT, with the gates, routers and feature cache of the PyTorch model) and the
PyTorch model on a GPU as one CUDA graph per forward with routers deciding on the device
(:func:`capture_cuda_graph`).
"""
from .cuda_graph import CapturedForward, capture_cuda_graph, capture_for_sampling
from .loader import Runtime, load

__all__ = ["CapturedForward", "Runtime", "capture_cuda_graph", "capture_for_sampling", "load"]

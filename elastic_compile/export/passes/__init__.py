"""Rewrite passes applied to exported graphs before ONNX conversion, one per file."""
from .complex_to_real import export_without_complex, has_complex, lower_complex
from .noop_squeeze import drop_noop_squeeze_dims

__all__ = ["drop_noop_squeeze_dims", "export_without_complex", "has_complex", "lower_complex"]

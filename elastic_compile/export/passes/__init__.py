"""Rewrite passes applied to exported graphs before ONNX conversion, one per file."""
from .complex_to_real import export_without_complex, has_complex, lower_complex

__all__ = ["export_without_complex", "has_complex", "lower_complex"]

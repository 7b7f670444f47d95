"""Capture: run the user's model once, record each candidate block's real inputs, export blocks as graphs."""
from .export import ExportedBlock, export_block
from .record import ModuleCall, call_model, record_calls

__all__ = ["ExportedBlock", "ModuleCall", "call_model", "export_block", "record_calls"]

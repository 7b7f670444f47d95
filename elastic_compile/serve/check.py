"""The runtime's own check of an export: load it back and compare the whole model with PyTorch.

``elastic_compile.export`` runs it on the staged artifact before it replaces the output directory, so a
runtime that would not reproduce the PyTorch elastic model is never written.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..artifact.tolerance import max_abs_diff, within
from ..capture.record import call_model
from ..errors import ExportError
from ..state import force, state_of
from .loader import load


def check_runtime(model, example_inputs, root: Path, dtype: str, indices: list[int], threads,
                  backend: str = "onnxruntime", base_factory=None) -> None:
    """Load the staged artifact with a runtime backend; compare whole-model outputs with ``model`` under
    dense, narrowest-exported-width and skip-every-other-block plans. ``base_factory``: the one the user gave
    the export (a runtime never takes it from the artifact)."""
    state = state_of(model)
    runtime = load(root, backend, threads=threads, base_factory=base_factory, cache="off")  # as `model` runs here
    runtime_inputs = pytree.tree_map_only(torch.Tensor, lambda t: t.to(runtime.device), example_inputs)
    widths = [state.config.width_buckets[i] for i in indices]
    skippable = {s.index for s in state.specs if s.skippable and state.config.allow_skip}
    plans = [(False, 1.0), (False, widths[0]), (frozenset(sorted(skippable)[::2]) or None, widths[len(widths) // 2])]
    for skip, width in plans:
        with torch.no_grad(), force(model, skip=skip, width=width):
            expected = [t for t in pytree.tree_leaves(call_model(model, example_inputs)) if isinstance(t, torch.Tensor)]
        with force(runtime, skip=skip, width=width):
            got = [t.cpu() for t in pytree.tree_leaves(call_model(runtime, runtime_inputs)) if isinstance(t, torch.Tensor)]
        diff, scale = max_abs_diff(got, expected)
        if not within(diff, scale, dtype):
            raise ExportError(f"the exported {backend} runtime to reproduce the PyTorch elastic model",
                              f"max |diff| {diff:.3g} with skip={skip}, width={width}", "Report the model.")
    runtime.close()

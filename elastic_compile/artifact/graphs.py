"""How an artifact's graphs are called, for the exporter that checks them and the runtime that runs them.

A graph takes its PyTorch values through :func:`graph_inputs` (real floats in the export dtype, complex values
as ``view_as_real`` pairs: see ``export/passes/complex_to_real.py``). An export's ``program`` (written by
``export/outside.py``) is the model's forward as steps, graphs of the ops between two block calls and the block
calls themselves, which :func:`run_steps` runs on named values.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .layout import CallLayout, OutputLayout

#: Export dtypes by the name the manifest records.
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def graph_inputs(tensors, dtype: torch.dtype, complex_inputs) -> list[torch.Tensor]:
    """What an exported graph takes for these PyTorch inputs: real floats cast to the export dtype, complex
    inputs as ``view_as_real`` pairs, the rest unchanged."""
    complex_inputs = set(complex_inputs) if complex_inputs else ()
    out = []
    for k, t in enumerate(tensors):
        if k in complex_inputs:
            t = torch.view_as_real(t.resolve_conj())
        elif t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        out.append(t if t.is_contiguous() else t.contiguous())
    return out


def attribute_at(module: torch.nn.Module, path: str):
    """The attribute a ``get_attr`` target (``"a.b.weight"``) names: parameter, buffer or constant tensor."""
    for part in path.split("."):
        module = getattr(module, part)
    return module


def run_steps(steps: Sequence[dict], env: dict[str, Any], run_graph: Callable, run_block: Callable) -> dict:
    """Run program ``steps`` on ``env`` (value name -> tensor; grows). ``run_block(step, tensors)`` returns a
    block step's (one with a "block" index) tensor outputs in layout order, ``run_graph(step, tensors)`` any
    other step's outputs."""
    for step in steps:
        tensors = [env[name] for name in step["inputs"]]
        outputs = run_block(step, tensors) if "block" in step else run_graph(step, tensors)
        for name, value in zip(step["outputs"], outputs):
            if name is not None:
                env[name] = value
        for name in step.get("release", ()):
            del env[name]
    return env


def run_graph_step(graph: Callable, step: dict, tensors: list) -> list:
    """Run a graph step's ``graph`` (list of tensors in, list out) on PyTorch values: complex values the step
    lists cross as ``view_as_real`` pairs (see :mod:`elastic_compile.export.passes.complex_to_real`)."""
    complex_inputs = step.get("complex_inputs")
    if complex_inputs:
        tensors = graph_inputs(tensors, torch.float32, complex_inputs)
    outputs = graph(tensors)
    if "complex_outputs" in step:
        outputs = list(outputs)
    for k in step.get("complex_outputs", ()):
        outputs[k] = torch.view_as_complex(outputs[k])
    return outputs


def plan_releases(steps: Sequence[dict], keep: Sequence[str]) -> list[dict]:
    """``steps``, each with a "release" list: the values no later step reads and ``keep`` does not name, so
    that :func:`run_steps` drops them as soon as they are used (as the model's own forward would drop them:
    a block's input is freed once the next block has run, and its memory is reused while still in cache)."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step["inputs"]:
            last[name] = index
        for name in step["outputs"]:
            if name is not None:
                last.setdefault(name, index)
    kept = set(keep)
    planned = [dict(step, release=[]) for step in steps]
    for name, index in last.items():
        if name not in kept:
            planned[index]["release"].append(name)
    return planned


class BlockCalls:
    """``run_block`` for :func:`run_steps`: call block modules with arguments rebuilt from their layouts."""

    def __init__(self, blocks: dict[int, torch.nn.Module], layouts: dict[int, tuple[CallLayout, OutputLayout]]):
        self.blocks = blocks
        self.layouts = layouts

    def __call__(self, step: dict, tensors: list) -> list:
        call, outputs = self.layouts[step["block"]]
        args, kwargs = call.rebuild(tensors)
        return outputs.tensors_of(self.blocks[step["block"]](*args, **kwargs))

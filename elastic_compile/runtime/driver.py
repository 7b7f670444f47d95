"""Run a model's forward as its exported program: the parts outside the blocks as graphs, the blocks through
their gates.

An export's ``program`` entry (see :mod:`elastic_compile.export.outside`) lists the forward as steps: graphs
(the ops between two block calls: embeddings, patchify, final norm and projection...) and block calls. A
:class:`ModelDriver` installed as the model's ``forward`` runs them: each graph in the backend, each block by
calling the block module, so its gate still decides per sample (router, ``force``, skips, feature cache,
records for ``stats``) and its :class:`~.executor.BlockExecutor` still runs the block's bucket graph. Module
hooks on the model still run (the driver *is* its forward).

The graphs take the example call's shapes, with any batch size where the export made the batch dynamic (a
call leaf's shape then says ``"batch"`` for that dimension; all of them must agree). A call that differs from
the example in any other way (argument names or structure, a tensor's other dimensions, dtype or device, a
non-tensor value), a call on fake tensors, and the FLOP profiling of ``stats`` run the model's own Python
forward instead, as without a driver: same results, the PyTorch parts just run in PyTorch; so does every call
while ``driver.enabled`` is False. ``driver.calls`` / ``driver.fallbacks`` count both kinds.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from ..capture.record import SignatureBinder
from ..capture.treespec import PLAIN_LEAVES, loaded_treespec
from ..export.layout import CallLayout, OutputLayout, dtype_name
from ..export.program import graph_inputs
from ..export.segments import attribute_at
from .state import state_of


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


class ModelDriver:
    """Callable with the model's forward signature (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, entry: dict, blocks_entries: Sequence[dict], root: Path, backend,
                 fallback: Callable, profiling: Callable[[], bool], lookahead=None):
        self.fallback = fallback
        self.lookahead = lookahead  # .lookahead.LookaheadLogits: router logits that graph steps computed
        self.profiling = profiling
        self.backend = backend
        self.root = root
        call = entry["call"]
        self.names = list(call["names"])
        self.in_spec_dumped = call["spec"]
        self.leaves = call["leaves"]
        arguments = loaded_treespec(self.in_spec_dumped).children()[1]
        self.flat_call = all(arguments.child(k).is_leaf() for k in range(arguments.num_children))
        self.out_spec_dumped = entry["outputs"]["spec"]
        self.output_values = list(entry["outputs"]["values"])
        self.output_constants = {int(k): v for k, v in entry["outputs"].get("constants", {}).items()}
        self.steps = plan_releases(entry["steps"], [v for v in entry["outputs"]["values"] if v is not None])
        self.parameters = {name: attribute_at(model, path) for name, path in entry.get("parameters", {}).items()}
        state = state_of(model)
        by_path = {block_entry["path"]: block_entry for block_entry in blocks_entries}
        blocks = {spec.index: block for spec, block in zip(state.specs, state.blocks)}
        layouts = {spec.index: (CallLayout.from_dict(by_path[spec.path]["layout"]),
                                OutputLayout.from_dict(by_path[spec.path]["outputs"]))
                   for spec in state.specs if spec.path in by_path}
        self.run_block = BlockCalls(blocks, layouts)
        self.bind = SignatureBinder(inspect.signature(fallback))
        self.enabled = True  # False: every call runs the Python forward (e.g. to compare both on one instance)
        self.calls = 0
        self.fallbacks = 0

    def run_graph(self, step: dict, tensors: list) -> list:
        outputs = run_graph_step(self.backend.graph(self.root / step["graph"]), step, tensors)
        ahead = step.get("lookahead")
        if ahead is None:
            return outputs
        # the graph's last output: the logits of the next block's router, from these very tensors
        if self.lookahead is not None:
            sources = [outputs[k] if kind == "out" else tensors[k] for kind, k in ahead["sources"]]
            self.lookahead.remember(int(ahead["block"]), sources, outputs[-1])
        return outputs[:-1]

    def flat_inputs(self, args: tuple, kwargs: dict) -> list | None:
        """The call's leaves when it is the exported call (see the module docstring), else None."""
        bound = self.bind(args, kwargs)
        if list(bound) != self.names:
            return None
        values = list(bound.values())
        # Every exported argument a leaf (the usual forward) and every value given one: the structures are equal
        # without a pytree walk (tens of microseconds before the first graph, each call).
        if not (self.flat_call and all(isinstance(v, PLAIN_LEAVES) for v in values)):
            values, spec = pytree.tree_flatten(((), bound))
            if spec != loaded_treespec(self.in_spec_dumped):
                return None
        rows = None
        for leaf, value in zip(self.leaves, values):
            if leaf["kind"] == "tensor":
                if (not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or not value.is_cpu
                        or value.ndim != len(leaf["shape"]) or dtype_name(value.dtype) != leaf["dtype"]):
                    return None
                for wanted, size in zip(leaf["shape"], value.shape):
                    if wanted == "batch":
                        rows = size if rows is None else rows
                        if size != rows or size < 1:
                            return None
                    elif size != wanted:
                        return None
            elif isinstance(value, torch.Tensor) or value != leaf["value"]:
                return None
        return values

    def __call__(self, *args, **kwargs):
        values = None if not self.enabled or self.profiling() else self.flat_inputs(args, kwargs)
        if values is None:
            self.fallbacks += 1
            return self.fallback(*args, **kwargs)
        self.calls += 1
        env = {leaf["value"]: value for leaf, value in zip(self.leaves, values)
               if leaf["kind"] == "tensor" and leaf["value"] is not None}
        env.update(self.parameters)
        env = run_steps(self.steps, env, self.run_graph, self.run_block)
        results = [env[name] if name is not None else self.output_constants[k]
                   for k, name in enumerate(self.output_values)]
        return pytree.tree_unflatten(results, loaded_treespec(self.out_spec_dumped))

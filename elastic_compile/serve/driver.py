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
while ``driver.enabled`` is False. ``driver.calls`` / ``driver.fallbacks`` count both kinds, and
``driver.profiled`` the fallbacks that were FLOP profiling.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from ..artifact.graphs import BlockCalls, attribute_at, plan_releases, run_graph_step, run_steps
from ..artifact.layout import CallLayout, OutputLayout, dtype_name
from ..capture.record import SignatureBinder
from ..capture.treespec import PLAIN_LEAVES, loaded_treespec
from ..errors import ArtifactError
from ..state import state_of


def _tensor_at(model: torch.nn.Module, path: str) -> torch.Tensor:
    """The parameter or buffer a program names; ArtifactError for anything else (a manifest names tensors only)."""
    try:
        value = attribute_at(model, path)
    except AttributeError:
        value = None
    if not isinstance(value, torch.Tensor):
        raise ArtifactError(f"program.parameters to name tensors of the {type(model).__name__}", repr(path),
                            "Export again.")
    return value


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
        self.parameters = {name: _tensor_at(model, path) for name, path in entry.get("parameters", {}).items()}
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
        self.profiled = 0

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
        profiling = self.profiling()
        values = None if not self.enabled or profiling else self.flat_inputs(args, kwargs)
        if values is None:
            self.fallbacks += 1
            self.profiled += profiling
            return self.fallback(*args, **kwargs)
        self.calls += 1
        env = {leaf["value"]: value for leaf, value in zip(self.leaves, values)
               if leaf["kind"] == "tensor" and leaf["value"] is not None}
        env.update(self.parameters)
        env = run_steps(self.steps, env, self.run_graph, self.run_block)
        results = [env[name] if name is not None else self.output_constants[k]
                   for k, name in enumerate(self.output_values)]
        return pytree.tree_unflatten(results, loaded_treespec(self.out_spec_dumped))

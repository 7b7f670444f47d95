"""Export one block with torch.export and evaluate its graph against the live module's weights."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from ..errors import CaptureError


@dataclass
class ExportedBlock:
    """A block's graph (ATen ops, ``get_attr`` nodes named by parameter FQN) and how to feed it.

    ``input_names[i]`` is the block argument (a name of ``forward``'s parameters) that flat placeholder ``i``
    belongs to; ``output_spec`` is the pytree structure of the block's output.
    """

    graph_module: fx.GraphModule
    placeholders: list[fx.Node]
    input_names: list[str | None]
    output_spec: pytree.TreeSpec

    def flat_inputs(self, args: tuple, kwargs: dict) -> list:
        return list(fx_pytree.tree_flatten_spec((args, kwargs), self.graph_module._in_spec))

    def output_node(self) -> fx.Node:
        return next(n for n in self.graph_module.graph.nodes if n.op == "output")

    def output_leaves(self) -> list[fx.Node]:
        return list(pytree.tree_leaves(self.output_node().args[0]))


def export_block(block: nn.Module, args: tuple, kwargs: dict, bound_names: dict[str, Any]) -> ExportedBlock:
    """torch.export ``block`` on one recorded call. Raises CaptureError with the exporter's message."""
    try:
        program = torch.export.export(block, tuple(args), dict(kwargs), strict=False)
    except Exception as exc:
        raise CaptureError(
            f"a block ({type(block).__name__}) that torch.export can capture",
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "Report the model; as a workaround exclude this block class from the transform.",
        ) from exc
    gm = program.module()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # Tag every leaf of each argument with the argument's name, then flatten exactly as the graph does.
    name_of = {id(v): k for k, v in bound_names.items()}
    tagged_args = tuple(_tag(a, name_of.get(id(a))) for a in args)
    tagged_kwargs = {k: _tag(v, k) for k, v in kwargs.items()}
    names = list(fx_pytree.tree_flatten_spec((tagged_args, tagged_kwargs), gm._in_spec))
    names = [n if isinstance(n, _Tag) else None for n in names]
    if len(names) != len(placeholders):
        raise CaptureError("one graph input per flattened argument", f"{len(placeholders)} vs {len(names)}",
                           "Report the model: its exported graph's inputs are not its arguments.")
    return ExportedBlock(gm, placeholders, [n.name if n is not None else None for n in names], gm._out_spec)


class _Tag:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


def _tag(value, name):
    return pytree.tree_map(lambda _: _Tag(name), value)


class GraphEvaluator(fx.Interpreter):
    """Runs an exported block graph with the *live* weights of ``module`` and optional per-node overrides.

    ``override(node, args, kwargs, compute)`` may return a value to use instead of the op's result; it gets
    ``compute`` to run the original op. ``get_attr`` reads the current parameter of ``module`` by name, so
    evaluations follow in-place rewrites (permutations) of the weights.
    """

    def __init__(self, exported: ExportedBlock, module: nn.Module, override: Callable | None = None):
        super().__init__(exported.graph_module, garbage_collect_values=True)
        self.exported = exported
        self.live = module
        self.override = override

    def get_attr(self, target, args, kwargs):
        obj = self.live
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def call_module(self, target, args, kwargs):
        if target.startswith("_guards"):
            return None
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if self.override is None:
            return target(*args, **kwargs)
        return self.override(self.current_node, args, kwargs, lambda: target(*args, **kwargs))

    def run_node(self, n):
        self.current_node = n
        return super().run_node(n)

    def evaluate(self, flat_inputs: list) -> list:
        out = self.run(*flat_inputs, enable_io_processing=False)
        return list(pytree.tree_leaves(out))

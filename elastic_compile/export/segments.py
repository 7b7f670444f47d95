"""Cut a captured model graph at its block calls: a straight-line program of *segments* and *block steps*.

Input: a :class:`~elastic_compile.capture.opaque_blocks.CapturedModel` (the model's forward as one graph, each
block call one ``OPAQUE_BLOCK`` node). Output: a :class:`ModelProgram`, the forward as steps in graph order:

* a :class:`Segment` is the ops between two block calls as a ``GraphModule`` of its own, whose inputs are the
  values it reads from earlier steps or the model's inputs and whose outputs are its values that later steps or
  the model's output read (parameters it reads become its own attributes);
* a :class:`BlockCall` names a block, the values it takes (its tensor arguments in layout order) and the values it
  returns (one per tensor output; ``None`` where nothing reads that output).

Values are named by the graph's node names. Guarantee: running the steps in order, each segment on its inputs
and each block on its inputs, computes every value the original graph computes, from the same inputs; segments
that compute nothing anyone reads are dropped. Values that cross a cut must be tensors (else
:class:`~elastic_compile.errors.ExportError`: the program cannot run as separate graphs), except symbolic sizes
of a batch-polymorphic capture, which each part recomputes from a tensor input of that size.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from ..capture.opaque_blocks import OPAQUE_BLOCK, CapturedModel
from ..errors import ExportError


@dataclass
class Segment:
    module: fx.GraphModule
    inputs: list[str]
    outputs: list[str]

    def compute_ops(self) -> int:
        return sum(n.op in ("call_function", "call_method", "call_module") for n in self.module.graph.nodes)


@dataclass
class BlockCall:
    block: int
    inputs: list[str]
    outputs: list[str | None]


@dataclass
class ModelProgram:
    """``inputs``: graph-input value per flat leaf of the call (None for leaves the graph does not take as a
    value: constants); ``outputs``: value per flat leaf of the result (None: constant ``output_constants[k]``);
    ``parameters``: values that are model attributes read directly by a block call or the output."""

    captured: CapturedModel
    inputs: list[str | None]
    steps: list = field(default_factory=list)
    outputs: list[str | None] = field(default_factory=list)
    output_constants: dict[int, object] = field(default_factory=dict)
    parameters: dict[str, str] = field(default_factory=dict)

    def torch_steps(self) -> list[dict]:
        """The steps as :func:`elastic_compile.artifact.graphs.run_steps` takes them, a segment's module under
        ``"segment"`` (run it in PyTorch) and a block's index under ``"block"``."""
        return [{"segment": step, "inputs": step.inputs, "outputs": step.outputs} if isinstance(step, Segment)
                else {"block": step.block, "inputs": step.inputs, "outputs": step.outputs} for step in self.steps]


def _is_block_call(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target is OPAQUE_BLOCK


def _block_output(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node)
            and _is_block_call(node.args[0]))


def _check_tensor(node: fx.Node, where: str) -> None:
    value = node.meta.get("val")
    if not isinstance(value, torch.Tensor):
        raise ExportError(f"only tensors crossing between the parts outside the blocks and the blocks ({where})",
                          f"{node.name}: {type(value).__name__}", "Those parts stay in PyTorch for this model.")


def split_at_blocks(captured: CapturedModel) -> ModelProgram:
    """See the module docstring."""
    graph = captured.graph_module.graph
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    output = next(n for n in nodes if n.op == "output")
    program = ModelProgram(captured, [n.name if n.users else None for n in placeholders])

    step_of: dict[fx.Node, int] = {}  # which step computes a node (placeholders and get_attr: none)
    groups: list[tuple[str, list[fx.Node]]] = []
    for node in nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if _is_block_call(node):
            groups.append(("block", [node]))
        elif _block_output(node):
            groups[step_of[node.args[0]]][1].append(node)
        else:
            if not groups or groups[-1][0] != "segment":
                groups.append(("segment", []))
            groups[-1][1].append(node)
        step_of[node] = len(groups) - 1

    for index, (kind, members) in enumerate(groups):
        if kind == "block":
            program.steps.append(_block_call(members, program))
        else:
            segment = _segment(captured.graph_module, members, index, step_of)
            if segment.outputs:
                program.steps.append(segment)

    leaves = output.args[0]
    leaves = list(leaves) if isinstance(leaves, (list, tuple)) else [leaves]
    for k, leaf in enumerate(leaves):
        if isinstance(leaf, fx.Node):
            if leaf.op == "get_attr":
                program.parameters[leaf.name] = leaf.target
            else:
                _check_tensor(leaf, "model output")
            program.outputs.append(leaf.name)
        else:
            program.outputs.append(None)
            program.output_constants[k] = leaf
    return program


def _block_call(members: list[fx.Node], program: ModelProgram) -> BlockCall:
    call, getitems = members[0], members[1:]
    tensors, index = call.args
    for value in tensors:
        if value.op == "get_attr":
            program.parameters[value.name] = value.target
        else:
            _check_tensor(value, f"input of block {index}")
    count = len(call.meta["val"])
    outputs: list[str | None] = [None] * count
    for item in getitems:
        outputs[item.args[1]] = item.name
    return BlockCall(int(index), [v.name for v in tensors], outputs)


def _is_size(node: fx.Node) -> bool:
    """A symbolic size (an expression of the capture's dynamic batch) rather than a tensor."""
    return isinstance(node.meta.get("val"), torch.SymInt)


def _size_source(size: fx.Node, inputs: list[fx.Node]) -> tuple[fx.Node, int] | None:
    """A tensor input and dimension whose size is the same symbolic expression as ``size``."""
    expr = size.meta["val"].node.expr
    for node in inputs:
        for dim, extent in enumerate(node.meta["val"].shape):
            if isinstance(extent, torch.SymInt) and extent.node.expr == expr:
                return node, dim
    return None


def _segment(root: fx.GraphModule, members: list[fx.Node], index: int, step_of: dict) -> Segment:
    """One segment's GraphModule. A symbolic size computed in another step (torch.export computes the batch once,
    from the first input, and reuses it) is recomputed here from a tensor input with that size, since only
    tensors cross between the parts."""
    inside = set(members)
    inputs: list[fx.Node] = []
    sizes: list[fx.Node] = []
    for node in members:
        for used in node.all_input_nodes:
            if used in inside or used.op == "get_attr" or used in inputs or used in sizes:
                continue
            if _is_size(used):
                sizes.append(used)
            else:
                _check_tensor(used, f"input of the part before step {index}")
                inputs.append(used)

    def read_elsewhere(node: fx.Node) -> bool:
        readers = [user for user in node.users if user not in inside]
        if _is_size(node):  # other parts recompute it; blocks and the model output cannot
            return any(user.op == "output" or _is_block_call(user) for user in readers)
        return bool(readers)
    outputs = [n for n in members if read_elsewhere(n)]
    for node in outputs:
        _check_tensor(node, f"output of the part before step {index}")

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in inputs:
        env[node] = graph.placeholder(node.name)
        env[node].meta = dict(node.meta)
    for size in sizes:
        source = _size_source(size, inputs)
        if source is None:
            raise ExportError(f"a tensor input of the part before step {index} with the size it reads",
                              f"{size.name} = {size.meta['val']} computed elsewhere, no input of that size",
                              "Those parts keep the example's static shapes.")
        env[size] = graph.call_function(torch.ops.aten.sym_size.int, (env[source[0]], source[1]))
        env[size].meta = dict(size.meta)
    for node in members:
        for used in node.all_input_nodes:
            if used.op == "get_attr" and used not in env:
                env[used] = graph.get_attr(used.target)
                env[used].meta = dict(used.meta)
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(tuple(env[n] for n in outputs))
    graph.eliminate_dead_code()
    module = fx.GraphModule(root, graph, class_name=f"Segment{index}")
    return Segment(module, [n.name for n in inputs], [n.name for n in outputs])

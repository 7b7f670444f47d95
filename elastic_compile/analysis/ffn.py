"""Find a block's FFNs by data flow on its graph: hidden units that can be dropped exactly.

An *FFN site* is a set of hidden units such that each unit ``j`` lives in its own rows of one or more
in-projections (linear / 1x1-or-any conv with groups=1), flows through per-unit ops only (activations, gating
products, depthwise convs, splits into GLU halves, concatenation with foreign channels) and ends in exactly one
contraction (the out-projection) that sums over units. Removing unit ``j`` everywhere is then *exactly* the
same as zeroing its out-projection column: the guarantee that makes width buckets correct.

The analysis is an abstract interpretation over ATen ops: each value is either foreign, or a ``UnitView`` that
says which axis carries units, where the unit segment sits on that axis, and which in-projection rows it maps
to. Any use of a unit value that is not per-unit (norms, attention, reductions, escaping to the output)
invalidates its site, with the reason kept for the report.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import fx

from ..capture.export import ExportedBlock
from .ops import (CONV_OPS, ELEMENTWISE_BINARY_OPS, ELEMENTWISE_UNARY_OPS, LAYOUT_OPS,
                  NO_VALUE_OPS, NONLINEAR_OPS, SPLIT_OPS, conv_groups, conv_transposed, node_shape, op_name,
                  param_source)
from .spec import FFNSite, ParamSlice


@dataclass(frozen=True)
class UnitView:
    """Element ``offset + p`` along ``axis`` is unit position ``p`` (``0 <= p < length``); position p reads
    row ``start + p`` of each in-projection origin in ``sources``."""

    sources: tuple[tuple[int, int], ...]
    axis: int
    length: int
    offset: int
    axis_size: int

    @property
    def mixed(self) -> bool:
        return self.offset != 0 or self.axis_size != self.length


@dataclass
class _Origin:
    node: fx.Node
    weight: str
    bias: str | None
    rows: int
    kind: str  # "linear" | "conv"


@dataclass
class _Group:
    origins: set[int] = field(default_factory=set)
    out_projections: list[tuple[fx.Node, str, UnitView, str]] = field(default_factory=list)
    channelwise: list[tuple[str, int, UnitView]] = field(default_factory=list)
    nonlinear: set[str] = field(default_factory=set)
    invalid: list[str] = field(default_factory=list)


class _UnitFlow:
    def __init__(self, exported: ExportedBlock):
        self.graph = exported.graph_module.graph
        self.origins: list[_Origin] = []
        self.parent: list[int] = []  # union-find over origins
        self.groups: dict[int, _Group] = {}
        self.env: dict[fx.Node, object] = {}

    # union-find -----------------------------------------------------------------------------------------
    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def group_of(self, view: UnitView) -> _Group:
        return self.groups[self.find(view.sources[0][0])]

    def merge(self, a: UnitView, b: UnitView) -> None:
        ra, rb = self.find(a.sources[0][0]), self.find(b.sources[0][0])
        if ra == rb:
            return
        ga, gb = self.groups.pop(rb), self.groups[ra]
        self.parent[rb] = ra
        gb.origins |= ga.origins
        gb.out_projections += ga.out_projections
        gb.channelwise += ga.channelwise
        gb.nonlinear |= ga.nonlinear
        gb.invalid += ga.invalid

    def invalidate(self, views, reason: str) -> None:
        for view in views:
            if isinstance(view, UnitView):
                self.group_of(view).invalid.append(reason)

    def new_origin(self, node: fx.Node, weight: str, bias: str | None, rows: int, kind: str, axis: int) -> UnitView:
        index = len(self.origins)
        self.origins.append(_Origin(node, weight, bias, rows, kind))
        self.parent.append(index)
        self.groups[index] = _Group(origins={index})
        return UnitView(((index, 0),), axis, rows, 0, rows)

    # transfer functions ----------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op == "output":
                self.invalidate(self._views_in(node.args), "a hidden unit value is a block output")
            elif node.op == "call_function":
                self.env[node] = self.transfer(node)

    def _views_in(self, args) -> list[UnitView]:
        found = []

        def visit(a):
            if isinstance(a, fx.Node):
                v = self.env.get(a)
                if isinstance(v, UnitView):
                    found.append(v)
                elif isinstance(v, list):
                    found.extend(x for x in v if isinstance(x, UnitView))
            elif isinstance(a, (list, tuple)):
                for x in a:
                    visit(x)
            elif isinstance(a, dict):
                for x in a.values():
                    visit(x)
        visit(args)
        return found

    def view_of(self, a):
        return self.env.get(a) if isinstance(a, fx.Node) else None

    def transfer(self, node: fx.Node):
        name = op_name(node)
        views = self._views_in((node.args, node.kwargs))
        if name == "linear":
            return self._linear(node, views)
        if name in CONV_OPS:
            return self._conv(node, views)
        if not views:
            return None
        if name in NO_VALUE_OPS:
            return None
        if name == "getitem":
            container = self.view_of(node.args[0])
            return container[node.args[1]] if isinstance(container, list) else None
        if name in ELEMENTWISE_UNARY_OPS and self._is_unary_use(node):
            view = self.view_of(node.args[0])
            if name in NONLINEAR_OPS:
                self.group_of(view).nonlinear.add(name)
            return view
        if name in ELEMENTWISE_BINARY_OPS:
            return self._binary(node, name, views)
        if name in LAYOUT_OPS:
            return self._layout(node, name, self.view_of(node.args[0]), views)
        if name in SPLIT_OPS:
            return self._split(node, name, self.view_of(node.args[0]), views)
        if name == "slice":
            return self._slice(node, self.view_of(node.args[0]), views)
        if name == "cat":
            return self._cat(node, views)
        self.invalidate(views, f"hidden units reach `{name}`, which mixes units")
        return None

    def _is_unary_use(self, node) -> bool:
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        return len(tensors) == 1 and isinstance(self.view_of(node.args[0]), UnitView)

    def _linear(self, node, views):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight = param_source(w)
        x_view = self.view_of(x)
        if any(v is not x_view for v in views) or weight is None or weight is not w:
            self.invalidate(views, "hidden units are used as weights of a matmul")
            return None
        shape = node_shape(node)
        if isinstance(x_view, UnitView):
            if x_view.axis != len(node_shape(x)) - 1:
                self.invalidate(views, "a linear contracts a non-unit axis of hidden units")
            else:
                self._out_projection(node, weight.target, x_view, "linear")
        bias = param_source(b) if isinstance(b, fx.Node) else None
        return self.new_origin(node, weight.target, bias.target if bias is not None else None, shape[-1], "linear",
                               len(shape) - 1)

    def _conv(self, node, views):
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        weight = param_source(w)
        x_view = self.view_of(x)
        if any(v is not x_view for v in views) or weight is None or weight is not w:
            self.invalidate(views, "hidden units are used as convolution weights")
            return None
        groups, shape = conv_groups(node), node_shape(node)
        in_channels = node_shape(x)[1]
        bias = param_source(b) if isinstance(b, fx.Node) else None
        if conv_transposed(node):
            self.invalidate(views, "hidden units reach a transposed convolution")
            return None
        if isinstance(x_view, UnitView) and groups > 1:
            if groups == in_channels == shape[1] and x_view.axis == 1 and not x_view.mixed:
                self.group_of(x_view).channelwise.append((weight.target, 0, x_view))
                if bias is not None:
                    self.group_of(x_view).channelwise.append((bias.target, 0, x_view))
                return x_view
            self.invalidate(views, "hidden units reach a grouped (not depthwise) convolution")
            return None
        if isinstance(x_view, UnitView):
            if x_view.axis != 1:
                self.invalidate(views, "a convolution contracts a non-unit axis of hidden units")
            else:
                self._out_projection(node, weight.target, x_view, "conv")
        if groups != 1:
            return None
        return self.new_origin(node, weight.target, bias.target if bias is not None else None, shape[1], "conv", 1)

    def _out_projection(self, node, weight: str, view: UnitView, kind: str):
        self.group_of(view).out_projections.append((node, weight, view, kind))

    def _binary(self, node, name, views):
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        va, vb = self.view_of(a), self.view_of(b)
        out_shape = node_shape(node)
        if isinstance(va, UnitView) and isinstance(vb, UnitView):
            if va.mixed or vb.mixed or va.axis != vb.axis or va.length != vb.length:
                self.invalidate(views, f"`{name}` combines hidden units that are not aligned")
                return None
            self.merge(va, vb)
            if name == "mul":
                self.group_of(va).nonlinear.add("gated product")
            sources = tuple(dict.fromkeys(va.sources + vb.sources))
            return UnitView(sources, va.axis, va.length, 0, va.length)
        view, other = (va, b) if isinstance(va, UnitView) else (vb, a)
        other_shape = node_shape(other) if isinstance(other, fx.Node) else ()
        aligned = view.axis - (len(out_shape) - len(other_shape))
        size = other_shape[aligned] if other_shape is not None and 0 <= aligned < len(other_shape) else 1
        if size == 1:
            return view
        param = param_source(other)
        if param is not None and not view.mixed and math.prod(other_shape) == view.axis_size:
            dim = next(i for i, s in enumerate(param.meta["val"].shape) if s == view.axis_size)
            self.group_of(view).channelwise.append((param.target, dim, view))
            return view
        self.invalidate(views, f"`{name}` combines hidden units with another activation of the same width")
        return None

    def _layout(self, node, name, view, views):
        if not isinstance(view, UnitView):
            self.invalidate(views, f"hidden units are used as an argument of `{name}`")
            return None
        in_shape, out_shape = node_shape(node.args[0]), node_shape(node)
        if name in ("permute",):
            dims = [d % len(in_shape) for d in node.args[1]]
            return _moved(view, dims.index(view.axis))
        if name in ("transpose", "t"):
            d0, d1 = ((node.args[1] % len(in_shape), node.args[2] % len(in_shape)) if name == "transpose" else (0, 1))
            axis = d1 if view.axis == d0 else d0 if view.axis == d1 else view.axis
            return _moved(view, axis)
        prefix = math.prod(in_shape[:view.axis])
        for axis in range(len(out_shape)):
            if math.prod(out_shape[:axis]) == prefix and out_shape[axis] == view.axis_size:
                return _moved(view, axis)
        self.invalidate(views, f"`{name}` splits or merges the hidden-unit axis (e.g. into heads)")
        return None

    def _split(self, node, name, view, views):
        if not isinstance(view, UnitView):
            self.invalidate(views, f"hidden units are used as an argument of `{name}`")
            return None
        in_shape = node_shape(node.args[0])
        dim = node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0) % len(in_shape)
        pieces = [tuple(p.shape) for p in node.meta["val"]]
        if dim != view.axis:
            return [view for _ in pieces]
        if view.mixed:
            self.invalidate(views, f"`{name}` cuts a concatenation of hidden units and other channels")
            return None
        out, start = [], 0
        for shape in pieces:
            length = shape[dim]
            out.append(UnitView(tuple((o, s + start) for o, s in view.sources), dim, length, 0, length))
            start += length
        return out

    def _slice(self, node, view, views):
        in_shape = node_shape(node.args[0])
        dim = (node.args[1] if len(node.args) > 1 else 0) % len(in_shape)
        if dim != view.axis:
            return view
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else 1
        length = node_shape(node)[dim]
        if view.mixed or step != 1 or not isinstance(start, int):
            self.invalidate(views, "a strided or partial slice of hidden units")
            return None
        start = max(0, start if start >= 0 else start + in_shape[dim])
        return UnitView(tuple((o, s + start) for o, s in view.sources), dim, length, 0, length)

    def _cat(self, node, views):
        tensors = node.args[0]
        dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % len(node_shape(node))
        unit_positions = [i for i, t in enumerate(tensors) if isinstance(self.view_of(t), UnitView)]
        if len(unit_positions) != 1 or self.view_of(tensors[unit_positions[0]]).mixed:
            self.invalidate(views, "hidden units of several groups are concatenated")
            return None
        view = self.view_of(tensors[unit_positions[0]])
        if dim != view.axis:
            self.invalidate(views, "hidden units are concatenated along another axis")
            return None
        offset = sum(node_shape(t)[dim] for t in tensors[:unit_positions[0]])
        return UnitView(view.sources, dim, view.length, offset, node_shape(node)[dim])


def _moved(view: UnitView, axis: int) -> UnitView:
    return UnitView(view.sources, axis, view.length, view.offset, view.axis_size)


def find_ffn_sites(exported: ExportedBlock, residual_inputs: set[str], residual_output_indices: set[int]
                   ) -> tuple[list[FFNSite], list[str]]:
    """FFN sites of a block graph, and the reasons why other MLP-shaped candidates were rejected.

    Only sites that read the residual stream (their in-projection input depends on a residual input) and write
    back to it (their out-projection reaches a residual output) count: this keeps e.g. timestep-embedding MLPs
    inside adaLN blocks fixed.
    """
    flow = _UnitFlow(exported)
    flow.run()
    from_residual = _reachable_from(exported, residual_inputs)
    to_residual = _reaching(exported, residual_output_indices)
    sites, rejected = [], []
    for root, group in flow.groups.items():
        origins = [flow.origins[i] for i in sorted(group.origins)]
        if not group.out_projections:
            continue  # a projection whose outputs never reach a contraction: not an FFN candidate at all
        label = ", ".join(o.weight.rsplit(".", 1)[0] for o in origins)
        if not any(o.node in from_residual for o in origins):
            continue
        if not group.nonlinear:
            continue  # a plain linear chain (e.g. attention out-projection feeding the next projection)
        if group.invalid:
            rejected.append(f"{label}: {group.invalid[0]}")
            continue
        if len(group.out_projections) != 1:
            rejected.append(f"{label}: hidden units reach {len(group.out_projections)} contractions")
            continue
        out_node, out_weight, view, kind = group.out_projections[0]
        if out_node not in to_residual:
            continue
        site, problem = _make_site(flow, group, origins, out_weight, view, kind)
        if problem:
            rejected.append(f"{label}: {problem}")
        else:
            sites.append(site)
    sites.sort(key=lambda s: s.out_projection.param)
    return sites, rejected


def _make_site(flow: _UnitFlow, group: _Group, origins, out_weight: str, view: UnitView, kind: str):
    hidden = view.length
    starts_by_origin: dict[int, list[int]] = {}
    for origin, start in view.sources:
        starts_by_origin.setdefault(origin, []).append(start)
    slices = []
    for index in sorted(group.origins):
        origin = flow.origins[index]
        starts = sorted(starts_by_origin.get(index, []))
        covered = sorted(r for s in starts for r in range(s, s + hidden))
        if covered != list(range(origin.rows)):
            return None, (f"rows of `{origin.weight}` are not all hidden units of this FFN "
                          f"({len(covered)} of {origin.rows} covered)")
        slices.append(ParamSlice(origin.weight, 0, tuple(starts), ()))
        if origin.bias is not None:
            slices.append(ParamSlice(origin.bias, 0, tuple(starts), ()))
    for param, dim, channel_view in group.channelwise:
        # param index p <-> position p of channel_view, which reads row (start + p) of each origin source
        origin, first = channel_view.sources[0]
        starts = sorted(s - first for o, s in view.sources if o == origin and 0 <= s - first < channel_view.length)
        slices.append(ParamSlice(param, dim, tuple(starts), ()))
    keep = tuple(r for r in ((0, view.offset), (view.offset + hidden, view.axis_size)) if r[1] > r[0])
    out_slice = ParamSlice(out_weight, 1, (view.offset,), keep)
    name = _common_module_prefix([s.param for s in slices] + [out_weight]) or "->".join(
        dict.fromkeys([s.module for s in slices] + [out_weight.rsplit(".", 1)[0]]))
    activations = sorted(group.nonlinear)
    return FFNSite(name=name, hidden=hidden, in_projections=tuple(slices), out_projection=out_slice,
                   activation="+".join(activations), kind=kind), None


def _common_module_prefix(params: list[str]) -> str:
    parts = [p.split(".")[:-2] for p in params]
    prefix = []
    for items in zip(*parts):
        if len(set(items)) != 1:
            break
        prefix.append(items[0])
    return ".".join(prefix)


def _reachable_from(exported: ExportedBlock, input_names: set[str]) -> set[fx.Node]:
    seen = {p for p, n in zip(exported.placeholders, exported.input_names) if n in input_names}
    for node in exported.graph_module.graph.nodes:
        if any(isinstance(a, fx.Node) and a in seen for a in node.all_input_nodes):
            seen.add(node)
    return seen


def _reaching(exported: ExportedBlock, output_indices: set[int]) -> set[fx.Node]:
    leaves = exported.output_leaves()
    stack = [leaves[i] for i in output_indices if isinstance(leaves[i], fx.Node)]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        stack.extend(node.all_input_nodes)
    return seen



"""Pass: lower complex-valued tensor arithmetic in an exported graph to real arithmetic.

ONNX has no complex tensors, so graphs that build complex numbers (Qwen-Image's rotary embedding:
``view_as_complex(x) * freqs`` then ``view_as_real``) cannot be exported. This pass rewrites an ATen FX graph
(``torch.export`` program's ``.module()``) so that every complex value ``z`` of shape ``S`` is carried as the real
tensor ``view_as_real(z)`` of shape ``S + (2,)`` (real part ``[..., 0]``, imaginary part ``[..., 1]``):

* ``view_as_complex(x)`` and ``view_as_real(z)`` become the identity;
* ``mul`` / ``add`` / ``sub`` / ``div`` by complex or real operands use (a+bi)(c+di) = (ac-bd) + (ad+bc)i etc.;
* shape ops (``unsqueeze``, ``reshape``/``view``, ``permute``, ``transpose``, ``slice``, ``select``, ``expand``,
  ``flatten``, ``cat``, ``stack``, ``squeeze``, ``clone``/``contiguous``) act on the leading dims only;
* ``conj``, ``real``, ``imag``, ``abs`` and dtype casts between complex dtypes have their real forms;
* complex constants (buffers) become real buffers of shape ``S + (2,)``;
* complex graph *inputs* become real inputs of shape ``S + (2,)``: feed ``torch.view_as_real(z)``;
* complex graph *outputs* are an error, or (``real_outputs=True``) real outputs of shape ``S + (2,)``: take
  ``torch.view_as_complex`` of them (their indices: ``gm.meta["complex_outputs"]``);
* ``torch.export``'s own metadata checks on complex values are dropped (they check the complex dtype).

Guarantee: the rewritten graph computes the same real outputs as the original one (up to float rounding of the
expanded products), for any values of its inputs; it contains no complex-valued node. It is pattern-based,
not model-based: it applies wherever these ops appear. An op it does not know raises
:class:`~elastic_compile.errors.UnsupportedComplexOpError` naming the op (nothing is silently wrong).
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from ...errors import UnsupportedComplexOpError

aten = torch.ops.aten
_DIM_AT_1 = (aten.select.int, aten.slice.Tensor, aten.unflatten.int, aten.narrow.default, aten.squeeze.dim,
             aten.unbind.int)
_DIM_AT_2 = (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default)
_REAL_OF = {torch.complex64: torch.float32, torch.complex128: torch.float64, torch.complex32: torch.float16}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _is_complex(value) -> bool:
    if isinstance(value, fx.Node):
        value = _val(value)
    return isinstance(value, torch.Tensor) and value.is_complex()


def has_complex(gm: fx.GraphModule) -> bool:
    """Whether any node of ``gm`` (inputs included) holds a complex tensor."""
    return any(_is_complex(node) for node in gm.graph.nodes)


class _Lowering:
    def __init__(self, gm: fx.GraphModule, real_outputs: bool = False):
        self.gm = gm
        self.old = gm.graph
        self.new = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.complex_inputs: list[int] = []
        self.real_outputs = real_outputs
        self.complex_outputs: list[int] = []

    # helpers -------------------------------------------------------------------------------------------
    def call(self, target, *args, **kwargs) -> fx.Node:
        return self.new.call_function(target, args, kwargs)

    def parts(self, z: fx.Node) -> tuple[fx.Node, fx.Node]:
        return self.call(aten.select.int, z, -1, 0), self.call(aten.select.int, z, -1, 1)

    def pack(self, re: fx.Node, im: fx.Node) -> fx.Node:
        return self.call(aten.stack.default, [re, im], -1)

    def operand(self, arg):
        """(real part, imaginary part or None) of an operand: complex nodes, real nodes or Python numbers."""
        if isinstance(arg, fx.Node):
            mapped = self.env[arg]
            return self.parts(mapped) if _is_complex(arg) else (mapped, None)
        if isinstance(arg, complex):
            return arg.real, arg.imag
        return arg, None

    @staticmethod
    def dim(d: int, ndim: int) -> int:
        """A dim of a complex tensor of rank ``ndim`` as a dim of its real carrier (rank ``ndim + 1``)."""
        return d + ndim if d < 0 else d

    # rules ---------------------------------------------------------------------------------------------
    def arithmetic(self, node: fx.Node) -> fx.Node:
        name = node.target.__name__.split(".")[0]
        a, b = node.args[0], node.args[1]
        if name in ("add", "mul") and not isinstance(a, fx.Node):
            a, b = b, a  # commutative: keep the tensor operand first
        if not isinstance(a, fx.Node):
            raise self.unsupported(node)
        alpha = node.kwargs.get("alpha", 1)
        (ar, ai), (br, bi) = self.operand(a), self.operand(b)
        mul, add, sub, div = aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor
        if name in ("add", "sub"):
            op = add if name == "add" else sub
            if alpha != 1:
                br = self.call(mul, br, alpha) if isinstance(br, fx.Node) else br * alpha
                bi = None if bi is None else (self.call(mul, bi, alpha) if isinstance(bi, fx.Node) else bi * alpha)
            re = self.call(op, ar, br)
            if ai is None and bi is None:
                return re
            if bi is None:  # complex +- real: broadcast the imaginary part to the result's shape
                im = ai if not isinstance(br, fx.Node) else self.call(add, ai, self.call(mul, br, 0))
            elif ai is None:  # real +- complex
                if isinstance(bi, fx.Node):
                    im = bi if name == "add" else self.call(aten.neg.default, bi)
                else:
                    im = self.call(add, self.call(mul, ar, 0), bi if name == "add" else -bi)
                if isinstance(bi, fx.Node):
                    im = self.call(add, im, self.call(mul, ar, 0))
            else:
                im = self.call(op, ai, bi)
            return self.pack(re, im)
        if name == "mul":
            if ai is None and bi is None:
                return self.call(mul, ar, br)
            if bi is None:
                return self.pack(self.call(mul, ar, br), self.call(mul, ai, br))
            if ai is None:
                return self.pack(self.call(mul, ar, br), self.call(mul, ar, bi))
            re = self.call(sub, self.call(mul, ar, br), self.call(mul, ai, bi))
            im = self.call(add, self.call(mul, ar, bi), self.call(mul, ai, br))
            return self.pack(re, im)
        if name == "div":
            if bi is None:
                return self.pack(self.call(div, ar, br), self.call(div, ai, br))
            denominator = self.call(add, self.call(mul, br, br), self.call(mul, bi, bi))
            if ai is None:
                re, im = self.call(mul, ar, br), self.call(aten.neg.default, self.call(mul, ar, bi))
            else:
                re = self.call(add, self.call(mul, ar, br), self.call(mul, ai, bi))
                im = self.call(sub, self.call(mul, ai, br), self.call(mul, ar, bi))
            return self.pack(self.call(div, re, denominator), self.call(div, im, denominator))
        raise self.unsupported(node)

    def shape_op(self, node: fx.Node) -> fx.Node:
        """Shape ops on a complex tensor, moved onto the leading dims of its real carrier."""
        target, args, kwargs = node.target, list(node.args), dict(node.kwargs)
        z = self.env[args[0]]
        ndim = _val(args[0]).ndim
        if target is aten.unsqueeze.default:
            return self.call(target, z, args[1] + ndim + 1 if args[1] < 0 else args[1])
        if target in (aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default):
            return self.call(target, z, list(args[1]) + [2], **kwargs)
        if target is aten.sym_size.int:
            return self.call(target, z, self.dim(args[1], ndim))
        if target is aten.permute.default:
            return self.call(target, z, [self.dim(d, ndim) for d in args[1]] + [ndim])
        if target is aten.transpose.int:
            return self.call(target, z, self.dim(args[1], ndim), self.dim(args[2], ndim))
        if target in _DIM_AT_1:  # op(z, dim, ...)
            dim = args[1] if len(args) > 1 else kwargs.pop("dim", 0)
            return self.call(target, z, self.dim(dim, ndim), *args[2:], **kwargs)
        if target in _DIM_AT_2:  # op(z, size(s), dim=0)
            dim = args[2] if len(args) > 2 else kwargs.pop("dim", 0)
            return self.call(target, z, args[1], self.dim(dim, ndim), **kwargs)
        if target is aten.flatten.using_ints:
            start = self.dim(args[1] if len(args) > 1 else 0, ndim)
            end = self.dim(args[2] if len(args) > 2 else -1, ndim)
            return self.call(target, z, start, end)
        if target is aten.squeeze.dims:
            return self.call(target, z, [self.dim(d, ndim) for d in args[1]])
        if target is aten.squeeze.default:
            return self.call(aten.squeeze.dims, z, [d for d, size in enumerate(_val(args[0]).shape) if size == 1])
        if target in (aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
                      aten.lift_fresh_copy.default):
            return self.call(target, z)
        raise self.unsupported(node)

    def lower(self, node: fx.Node):
        target = node.target
        inputs_complex = any(_is_complex(a) for a in node.all_input_nodes)
        if target is aten.view_as_complex.default:
            return self.call(aten.contiguous.default, self.env[node.args[0]])
        if target is aten.view_as_real.default:
            return self.env[node.args[0]]
        if target is operator.getitem:
            return self.call(operator.getitem, self.env[node.args[0]], node.args[1])
        if target in (aten.real.default,):
            return self.call(aten.select.int, self.env[node.args[0]], -1, 0)
        if target in (aten.imag.default,):
            return self.call(aten.select.int, self.env[node.args[0]], -1, 1)
        if target in (aten.conj.default, aten._conj.default, aten.conj_physical.default, aten.resolve_conj.default):
            if target is aten.resolve_conj.default:
                return self.env[node.args[0]]
            re, im = self.parts(self.env[node.args[0]])
            return self.pack(re, self.call(aten.neg.default, im))
        if target is aten.abs.default and inputs_complex:
            re, im = self.parts(self.env[node.args[0]])
            return self.call(aten.sqrt.default, self.call(aten.add.Tensor, self.call(aten.mul.Tensor, re, re),
                                                          self.call(aten.mul.Tensor, im, im)))
        if target in (aten.mul.Tensor, aten.mul.Scalar, aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor,
                      aten.sub.Scalar, aten.div.Tensor, aten.div.Scalar):
            return self.arithmetic(node)
        if target in (aten.cat.default, aten.stack.default):
            tensors = node.args[0]
            ndim = _val(tensors[0]).ndim
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            parts = [self.env[t] if _is_complex(t) else self.pack(self.env[t], self.call(aten.mul.Tensor, self.env[t], 0))
                     for t in tensors]
            rank = ndim + 1 if target is aten.stack.default else ndim
            return self.call(target, parts, self.dim(dim, rank))
        if target in (aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.to.dtype_layout):
            source = node.args[0]
            value = _val(node)
            if _is_complex(source) and value is not None and value.is_complex():
                return self.call(aten.to.dtype, self.env[source], _REAL_OF[value.dtype])
            if not _is_complex(source) and value is not None and value.is_complex():
                real = self.call(aten.to.dtype, self.env[source], _REAL_OF[value.dtype])
                return self.pack(real, self.call(aten.mul.Tensor, real, 0))
            raise self.unsupported(node)  # complex -> real cast drops the imaginary part: make it explicit
        if node.args and isinstance(node.args[0], fx.Node) and _is_complex(node.args[0]):
            return self.shape_op(node)
        raise self.unsupported(node)

    def attribute(self, target: str):
        value = self.gm
        for part in target.split("."):
            value = getattr(value, part)
        return value

    def real_attribute(self, node: fx.Node) -> fx.Node:
        """A complex constant (e.g. a rotary-frequency buffer) stored as its ``view_as_real`` carrier."""
        real = torch.view_as_real(self.attribute(node.target).detach().resolve_conj()).clone()
        name = "_real_" + str(node.target).replace(".", "_")
        self.gm.register_buffer(name, real)
        carrier = self.new.get_attr(name)
        carrier.meta["val"] = real
        return carrier

    @staticmethod
    def unsupported(node: fx.Node) -> UnsupportedComplexOpError:
        return UnsupportedComplexOpError(
            "complex-valued ops the complex-to-real pass can lower (arithmetic, shape ops, view_as_real/complex)",
            f"{node.target} at node {node.name}",
            "Add a rule for it in elastic_compile/export/passes/complex_to_real.py, or report the model.")

    def run(self) -> fx.Graph:
        placeholder_index = 0
        for node in self.old.nodes:
            if node.op == "placeholder":
                self.env[node] = self.new.node_copy(node)
                if _is_complex(node):
                    self.complex_inputs.append(placeholder_index)
                    value = _val(node)
                    self.env[node].meta["val"] = torch.empty(tuple(value.shape) + (2,), dtype=_REAL_OF[value.dtype],
                                                             device="meta")
                placeholder_index += 1
            elif node.op == "get_attr" and _is_complex(self.attribute(node.target)):
                self.env[node] = self.real_attribute(node)
            elif node.op == "call_module" and str(node.target).startswith("_guards"):
                continue  # input guards check the original (complex) input dtypes; re-export re-derives them
            elif node.op == "output":
                leaves = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
                self.complex_outputs = [k for k, leaf in enumerate(leaves) if _is_complex(leaf)]
                if self.complex_outputs and not self.real_outputs:
                    raise UnsupportedComplexOpError("real-valued graph outputs", "a complex output",
                                                    "Return view_as_real(...) from the block, or report the model.")
                self.new.node_copy(node, lambda n: self.env[n])
            elif node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
                continue  # checks the complex dtype the lowered graph no longer has
            elif node.op == "call_function" and (_is_complex(node) or any(_is_complex(a) for a in node.all_input_nodes)):
                self.env[node] = self.lower(node)
            else:
                self.env[node] = self.new.node_copy(node, lambda n: self.env[n])
        return self.new


def lower_complex(gm: fx.GraphModule, real_outputs: bool = False) -> list[int]:
    """Rewrite ``gm`` in place (see the module docstring). Returns the indices of its placeholders that were
    complex and now expect ``torch.view_as_real`` of the original input; ``gm.meta["complex_outputs"]`` lists
    the outputs that are now ``view_as_real`` pairs (``real_outputs=True``, else complex outputs raise)."""
    lowering = _Lowering(gm, real_outputs)
    graph = lowering.run()
    gm.meta["complex_outputs"] = lowering.complex_outputs
    graph._codegen = gm.graph._codegen
    gm.graph = graph
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return lowering.complex_inputs


def export_without_complex(program: torch.export.ExportedProgram, example: list[torch.Tensor],
                           real_outputs: bool = False, dynamic_shapes=None):
    """``(program, complex_input_indices, complex_output_indices)``: the program unchanged when it has no complex
    values, else the lowered graph re-exported with real inputs (``view_as_real`` of the complex examples;
    ``dynamic_shapes`` as for the original export: the pair dimension is last) and, with ``real_outputs``,
    complex outputs as ``view_as_real`` pairs."""
    gm = program.module()
    if not has_complex(gm):
        return program, [], []
    indices = lower_complex(gm, real_outputs)
    real_example = tuple(torch.view_as_real(t.resolve_conj()).contiguous() if i in indices else t
                         for i, t in enumerate(example))
    lowered = torch.export.export(gm, real_example, dynamic_shapes=dynamic_shapes, strict=False)
    return lowered, indices, list(gm.meta["complex_outputs"])

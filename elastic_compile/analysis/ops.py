"""Classification of ATen ops for the graph analyses (by overload packet name, e.g. ``gelu``)."""
from __future__ import annotations

import operator

import torch
from torch import fx

# Ops through which a value passes unchanged up to layout (the residual "skip path" and unit tracking).
LAYOUT_OPS = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten",
    "unflatten", "contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as", "expand", "lift_fresh_copy",
}
NO_VALUE_OPS = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}
IDENTITY_OPS = {"dropout", "native_dropout", "feature_dropout", "alpha_dropout"}
SPLIT_OPS = {"split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_chunk"}

NONLINEAR_OPS = {
    "gelu", "silu", "relu", "relu6", "sigmoid", "tanh", "erf", "exp", "softplus", "mish", "hardswish",
    "hardsigmoid", "leaky_relu", "elu", "selu", "celu", "log_sigmoid", "square", "pow", "hardtanh", "log1p",
}
ELEMENTWISE_UNARY_OPS = NONLINEAR_OPS | IDENTITY_OPS | {"neg", "abs", "clamp", "clamp_min", "clamp_max", "sqrt"}
ELEMENTWISE_BINARY_OPS = {"add", "sub", "mul", "div", "maximum", "minimum", "rsub", "true_divide"}

TOKEN_MIXING_OPS = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_cudnn_attention", "matmul", "bmm", "einsum",
    "baddbmm",
}
CONV_OPS = {"conv1d", "conv2d", "conv3d", "convolution", "_convolution"}


def op_name(node: fx.Node) -> str:
    """The overload packet name of a call_function node ('getitem' for operator.getitem, '' otherwise)."""
    if node.op != "call_function":
        return ""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "overloadpacket", None)
    if packet is not None:
        name = packet.__name__
        return name[:-1] if name.endswith("_") and not name.endswith("__") else name  # in-place variants
    return getattr(node.target, "__name__", "")


def node_value(node) -> object:
    """The example value recorded by torch.export for a node (a FakeTensor, a tuple of them, or a constant)."""
    if isinstance(node, fx.Node):
        return node.meta.get("val")
    return node


def node_shape(node) -> tuple[int, ...] | None:
    """The node's shape, or None when it is not a tensor or has a data-dependent size (a draft-export graph)."""
    val = node_value(node)
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except Exception:
            return None
    return None


def param_source(node) -> fx.Node | None:
    """The ``get_attr`` node a value is (a layout view of), or None when it derives from activations."""
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node
        if node.op == "call_function" and op_name(node) in LAYOUT_OPS and node.args:
            node = node.args[0]
            continue
        return None
    return None


def conv_groups(node: fx.Node) -> int:
    name = op_name(node)
    args = list(node.args) + [None] * 10
    if name in ("convolution", "_convolution"):
        return int(node.kwargs.get("groups", args[8] if args[8] is not None else 1))
    return int(node.kwargs.get("groups", args[6] if args[6] is not None else 1))


def conv_transposed(node: fx.Node) -> bool:
    if op_name(node) in ("convolution", "_convolution"):
        return bool(node.args[6]) if len(node.args) > 6 else False
    return False

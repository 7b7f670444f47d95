"""Pass: fold constant subgraphs of an ONNX model while keeping its weights as named, replaceable initializers.

The unoptimised dynamo export (see :mod:`..onnx_io`) is full of shape arithmetic on constants and emits
``SplitToSequence`` + ``SequenceAt`` for ``chunk``/``split``, which is not defined for bfloat16 and is a poor fit
for TensorRT. This pass runs the onnxscript optimizer (constant folding, ``SplitToSequence`` -> ``Split``,
dead-code removal) with every weight initializer temporarily declared a graph input, so no weight is folded into a
new anonymous constant (e.g. a pre-transposed copy): weights keep their names, shapes and values, which is what
template sharing and external weight files rely on.

Guarantee: the returned model computes the same function; its initializers named in ``keep`` are the same
tensors (the optimizer may drop ones that become unused); its graph inputs and outputs are unchanged.
"""
from __future__ import annotations

import copy

import onnx


def fold_constants(model: onnx.ModelProto, keep_prefixes: tuple[str, ...]) -> onnx.ModelProto:
    """Optimise ``model`` (see the module docstring); initializers whose names start with one of
    ``keep_prefixes`` are protected from folding."""
    import onnxscript.optimizer

    original_inputs = [copy.deepcopy(i) for i in model.graph.input]
    protected = [init for init in model.graph.initializer if init.name.startswith(keep_prefixes)]
    for init in protected:
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    optimized = onnxscript.optimizer.optimize(model)
    del optimized.graph.input[:]
    optimized.graph.input.extend(original_inputs)
    return optimized

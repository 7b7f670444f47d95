"""FLOP counting that sees attention on every device.

``torch.utils.flop_counter`` has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but
not for ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel ``F.scaled_dot_product_attention``
dispatches to on CPU: there, every attention's QK^T and AV matmuls would count zero FLOPs, making the FLOP
fraction of a narrow-FFN plan look smaller than it is (attention does not narrow with the FFN). :func:`flop_counter` is
``FlopCounterMode`` with the CPU kernel counted by the same formula PyTorch uses for the CUDA ones, so a model
counts the same FLOPs on CPU and on GPU.
"""
from __future__ import annotations

import torch
from torch.utils import flop_counter as _fc

_aten = torch.ops.aten


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def flop_counter() -> _fc.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention (use as a context manager)."""
    return _fc.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)

"""FLOP counting that sees attention on every device, and flex attention run eagerly.

``torch.utils.flop_counter`` has formulas for the CUDA attention kernels (flash, memory-efficient, cuDNN) but
not for ``aten._scaled_dot_product_flash_attention_for_cpu``, the kernel ``F.scaled_dot_product_attention``
dispatches to on CPU: there, every attention's QK^T and AV matmuls would count zero FLOPs, making the FLOP
fraction of a narrow-FFN plan look smaller than it is (attention does not narrow with the FFN). :func:`flop_counter` is
``FlopCounterMode`` with the CPU kernel counted by the same formula PyTorch uses for the CUDA ones, so a model
counts the same FLOPs on CPU and on GPU.

Flex attention (``torch.nn.attention.flex_attention``, e.g. Kandinsky 6 SR's NABLA attention) reaches the counter
as the higher-order operator ``torch.ops.higher_order.flex_attention``, which ``FlopCounterMode``'s dispatch mode
refuses (it only handles ``cond`` and Triton kernels), so counting a model that runs it eagerly raised a
``TypeError``. Here the mode runs the operator below itself and counts it like dense attention (see
:func:`flex_attention_flops`).
"""
from __future__ import annotations

import torch
from torch._higher_order_ops.flex_attention import flex_attention, flex_attention_backward
from torch.utils import flop_counter as _fc

_aten = torch.ops.aten


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return _fc.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                  **kwargs) -> int:
    return _fc.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flex_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one flex attention: ``2*B*H*Lq*Lk*D`` for QK^T plus ``2*B*H*Lq*Lk*Dv`` for PV, with ``H`` the query
    heads (grouped-query attention shares key/value heads, not the matmuls).

    Counted dense: the block mask and the score modification are ignored, so a block-sparse mask (NABLA, sliding
    windows, causal) counts every query-key pair, as an attention kernel without sparsity would compute them. This
    over-counts what a fused sparse kernel executes, but the same count is used for every plan of a model, so a
    block's share of the total stays comparable; attention does not change with the routers' choices."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


def flex_attention_backward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """Gradient FLOPs of one flex attention, dense like :func:`flex_attention_flops`: the four matmuls of the
    backward (dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q), i.e. twice the forward's two."""
    return 2 * flex_attention_flops(query_shape, key_shape, value_shape)


CPU_ATTENTION_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    flex_attention: flex_attention_flops,
    flex_attention_backward: flex_attention_backward_flops,
}

#: higher-order operators counted by formula: the mode runs them below itself, so their inner ops are not counted
_COUNTED_HIGHER_ORDER = frozenset({flex_attention, flex_attention_backward})


class _HigherOrderCountingMode(_fc._FlopCounterMode):
    """The dispatch mode of ``FlopCounterMode`` that also runs and counts the higher-order operators above."""

    def _handle_higher_order_ops(self, func, types, args, kwargs):
        if func in _COUNTED_HIGHER_ORDER:
            # the HOP dispatcher has popped this mode: the call runs below it (fake or real tensors alike)
            out = func(*args, **kwargs)
            return self.counter._count_flops(func, out, args, kwargs)
        return super()._handle_higher_order_ops(func, types, args, kwargs)


class _FlopCounter(_fc.FlopCounterMode):
    """``FlopCounterMode`` with the dispatch mode above, counting under the ``force_eager`` compile stance."""

    def __enter__(self):
        # Eager flex attention wraps its operator in torch.compile(fullgraph=True); under any dispatch mode dynamo
        # skips the frame and runs it eagerly anyway, then raises because fullgraph found no compiled frame. Under
        # force_eager it runs the same eager call without that check. The stance is process-wide while counting:
        # compiled functions of other threads run eagerly meanwhile (same results, slower).
        self._stance = torch.compiler.set_stance("force_eager")
        self._stance.__enter__()
        try:
            counter = super().__enter__()
            # the plain dispatch mode swapped for the one that counts flex attention (same counter, same place)
            self.mode.__exit__(None, None, None)
            self.mode = _HigherOrderCountingMode(self)
            self.mode.__enter__()
        except BaseException:
            self._stance.__exit__(None, None, None)
            raise
        return counter

    def __exit__(self, *args):
        try:
            return super().__exit__(*args)
        finally:
            self._stance.__exit__(None, None, None)


def flop_counter() -> _fc.FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU attention and eager flex attention (a context manager)."""
    return _FlopCounter(display=False, custom_mapping=CPU_ATTENTION_FORMULAS)

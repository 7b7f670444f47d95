"""CPU attention is counted, with the formula PyTorch uses for its CUDA kernels."""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.nn import functional as F

import elastic_compile as ec
from elastic_compile.analysis.flop_counter import flop_counter
from elastic_compile.models import DiT, dit_config


def _count(fn, *args):
    with flop_counter() as counter, torch.no_grad():
        fn(*args)
    return counter.get_total_flops()


def _explicit_attention(q, k, v):
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.softmax(-1) @ v


@settings(max_examples=15, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), queries=st.integers(1, 40), keys=st.integers(1, 40),
       head_dim=st.sampled_from([8, 16, 64]))
def test_cpu_sdpa_counts_what_its_explicit_matmuls_count(batch, heads, queries, keys, head_dim):
    q = torch.randn(batch, heads, queries, head_dim)
    k, v = torch.randn(batch, heads, keys, head_dim), torch.randn(batch, heads, keys, head_dim)
    fused = _count(F.scaled_dot_product_attention, q, k, v)
    assert fused == _count(_explicit_attention, q, k, v) == 4 * batch * heads * queries * keys * head_dim


def test_attention_backward_on_cpu_is_counted():
    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    with flop_counter() as counter:
        F.scaled_dot_product_attention(q, q, q).sum().backward()
    forward = 4 * 2 * 16 * 16 * 8
    assert counter.get_total_flops() >= 3 * forward  # backward ~2.5x forward (PyTorch's own formula)


def test_narrow_ffn_fraction_includes_attention():
    """DiT-B/2 shape, 256 tokens: FFN at 1/4 keeps attention's projections and its QK^T/AV matmuls."""
    torch.manual_seed(0)
    model = DiT(input_size=32, patch_size=2, in_channels=4, num_classes=10, **dit_config("B", depth=2)).eval()
    inputs = dict(x=torch.randn(1, 4, 32, 32), t=torch.tensor([500.0]), y=torch.tensor([3]))
    ec.transform(model, example_inputs=inputs)
    with torch.no_grad(), ec.force(model, skip=False, width=0.25):
        model(**inputs)
    stats = ec.stats(model)
    d, n = 768, 256
    linear, attention = 2 * n * 12 * d * d, 4 * n * n * d
    per_block_quarter = 2 * n * 6 * d * d + attention
    block_share = 2 * (linear + attention) / stats.dense_flops
    assert block_share == pytest.approx(1.0, abs=0.01)  # the blocks are the model's FLOPs
    assert stats.executed_flops_fraction == pytest.approx(per_block_quarter / (linear + attention), abs=0.01)

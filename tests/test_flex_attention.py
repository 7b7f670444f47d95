"""Flex attention (``torch.nn.attention.flex_attention``) run eagerly: counted like dense attention by
``analysis.flop_counter`` (real and shape-only tensors), and a DiT whose forward hands one ``BlockMask`` to every
block (as AnyFlow-FAR does) is found, skippable and exact, with the FLOP fractions its plans really execute."""
import warnings

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import elastic_compile as ec
from elastic_compile.analysis.flop_counter import flop_counter

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # "flex_attention called without torch.compile()"


def _count(fn, *args, **kwargs):
    with flop_counter() as counter, torch.no_grad():
        fn(*args, **kwargs)
    return counter.get_total_flops()


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@pytest.mark.parametrize("batch,heads,kv_heads,queries,keys,head_dim,value_dim",
                         [(1, 1, 1, 16, 16, 16, 16), (2, 4, 2, 32, 48, 16, 32), (3, 2, 1, 128, 256, 16, 16)])
def test_flex_attention_counts_its_qk_and_pv_matmuls(batch, heads, kv_heads, queries, keys, head_dim, value_dim):
    q = torch.randn(batch, heads, queries, head_dim)
    k, v = torch.randn(batch, kv_heads, keys, head_dim), torch.randn(batch, kv_heads, keys, value_dim)
    counted = _count(flex_attention, q, k, v, enable_gqa=kv_heads != heads)
    assert counted == 2 * batch * heads * queries * keys * (head_dim + value_dim)
    if kv_heads == heads and head_dim == value_dim:  # the same count as the matmuls of explicit attention
        assert counted == _count(lambda: (q @ k.transpose(-2, -1)).softmax(-1) @ v)


def test_a_block_mask_is_counted_dense():
    q = torch.randn(1, 2, 128, 16)
    mask = create_block_mask(_causal, None, None, 128, 128, device="cpu")
    assert _count(flex_attention, q, q, q, block_mask=mask) == _count(flex_attention, q, q, q) == 4 * 2 * 128 * 128 * 16


def test_flex_attention_is_counted_on_shape_only_tensors():
    with FakeTensorMode(allow_non_fake_inputs=True):
        q = torch.zeros(2, 2, 64, 16)
        flops = _count(flex_attention, q, q, q)
    assert flops == 4 * 2 * 2 * 64 * 64 * 16


class _Block(nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, block_mask):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(flex_attention(q, k, v, block_mask=block_mask).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class _CausalFlexDiT(nn.Module):
    """Frame-causal tokens: the forward builds a BlockMask and hands it to every block as a call argument."""

    def __init__(self, dim=32, depth=3):
        super().__init__()
        self.embed, self.out = nn.Linear(4, dim), nn.Linear(dim, 4)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(depth))

    def forward(self, x):
        mask = create_block_mask(_causal, None, None, x.shape[1], x.shape[1], device="cpu")
        h = self.embed(x)
        for block in self.blocks:
            h = block(h, mask)
        return self.out(h)


def test_blocks_given_a_block_mask_are_elastic_and_exact():
    torch.manual_seed(0)
    model = _CausalFlexDiT().eval()
    x = torch.randn(2, 128, 4)
    with torch.no_grad():
        dense = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ec.transform(model, ec.ElasticConfig(width_buckets=(0.25, 1.0)), example_inputs=dict(x=x))
    report = ec.report(model)
    assert len(report.blocks) == 3 and all(b.skippable for b in report.blocks), report
    with torch.no_grad():
        assert (model(x) - dense).abs().max() <= 1e-5
    fractions = {}
    for key, plan in (("skip_all", dict(skip=True)), ("width_quarter", dict(skip=False, width=0.25))):
        with torch.no_grad(), ec.force(model, **plan):
            model(x)
        fractions[key] = ec.stats(model).executed_flops_fraction
    # per block: 2*n*d*(3d + d + 8d) linear FLOPs (n=128 tokens, d=32) plus 4*n*n*d of attention, per sample
    n, d = 128, 32
    linear, attention, ffn = 2 * n * d * 12 * d, 4 * n * n * d, 2 * n * d * 8 * d
    block = linear + attention
    outside = 2 * n * 4 * d * 2
    assert fractions["skip_all"] == pytest.approx(outside / (3 * block + outside), rel=0.05)
    assert fractions["width_quarter"] == pytest.approx((3 * (block - 0.75 * ffn) + outside) / (3 * block + outside),
                                                       abs=0.01)

"""Issue 24, class 6 without a batch axis: blocks that take a packed ``(B*L, D)`` token stream (as Cosmos3-Omni's
decoder layers take their packed ``(tokens, hidden)`` streams). Dim 0 counts tokens, so the analysis gives such
blocks one routing decision per call (``nn/call_router.py``): transform does not abort, untrained = dense, the
report says why, and a decision covers the whole batch, so each sample equals its run alone under it."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import elastic_compile as ec
from elastic_compile.nn.call_router import CallRouter
from elastic_compile.state import state_of
from helpers import randomize_routers, sample_inputs
from styles import DIM, HEADS, Mlp, PatchEmbed, TimestepEmbedder, modulate, unpatchify

BATCH = 3


class PackedBlock(nn.Module):
    """adaLN joint-attention block over two packed streams, as Cosmos3-Omni's decoder layers take theirs: image
    tokens ``x`` (B*L, D) and text tokens ``y`` (B*T, D), each sample attending over its own text and image
    tokens; ``c`` (B, D) modulates both."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def attention(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))

    def forward(self, x, y, c):
        B, D = c.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        text = y.shape[0] // B
        joint = torch.cat([y.view(B, text, D), x.view(B, -1, D)], dim=1)
        h = gate1.unsqueeze(1) * self.attention(modulate(self.norm1(joint), shift1, scale1))
        y = y + h[:, :text].reshape(-1, D)
        x = x + h[:, text:].reshape(-1, D)
        h = self.mlp(modulate(self.norm2(x).view(B, -1, D), shift2, scale2))
        return x + (gate2.unsqueeze(1) * h).reshape(-1, D), y


class PackedDiT(nn.Module):
    def __init__(self, depth=2, channels=4, text_dim=12):
        super().__init__()
        self.channels = channels
        self.x_embedder, self.t_embedder = PatchEmbed(channels, DIM), TimestepEmbedder(DIM)
        self.y_embedder = nn.Linear(text_dim, DIM)
        self.blocks = nn.ModuleList([PackedBlock(DIM, HEADS) for _ in range(depth)])
        self.final = nn.Linear(DIM, 4 * channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x)
        B, L, D = x.shape
        c = self.t_embedder(t)
        x, y = x.reshape(B * L, D), self.y_embedder(y).reshape(-1, D)  # packed: no batch axis inside the blocks
        for block in self.blocks:
            x, y = block(x, y, c)
        return unpatchify(self.final(x.view(B, L, D)), self.channels)


def packed(batch=BATCH):
    return PackedDiT().eval(), dict(x=torch.randn(batch, 4, 8, 8), t=torch.rand(batch) * 1000,
                                    y=torch.randn(batch, 5, 12))


@pytest.fixture(scope="module")
def transformed():
    torch.manual_seed(0)
    model, inputs = packed()
    original = copy.deepcopy(model)
    ec.transform(model, example_inputs=inputs)
    return model, original, inputs


def test_packed_blocks_route_once_per_call_and_stay_exact(transformed):
    model, original, inputs = transformed
    state = state_of(model)
    assert [s.path for s in state.specs] == ["blocks.0", "blocks.1"]
    assert all(s.skippable and s.sites and not s.batch_axis and not s.rows_split for s in state.specs)
    assert all(isinstance(r, CallRouter) for r in state.routers.values())
    report = ec.report(model)
    for block in report.blocks:
        assert any(n.startswith("no batch axis (streams of 15 and 48 rows)") for n in block.notes), block.notes
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), original(**inputs), atol=1e-5, rtol=1e-5)
    assert all(len(call.run) == 1 for call in state.calls)  # one decision per block call, for the whole batch


def test_a_decision_covers_the_whole_batch(transformed):
    """Routers set by hand (block 0 skipped, block 1 at width 1/4) and random ones: the batch runs under one
    decision per block, and each sample equals its run alone under that decision."""
    model, original, inputs = transformed
    state = state_of(model)
    saved = copy.deepcopy(state.routers)
    try:
        with torch.no_grad():
            quarter, widths = state.bucket_index(0.25), state.routers[1].num_widths
            state.routers[0].fc2.bias[0] = -8.0  # run logit: skip
            state.routers[1].fc2.bias[1:1 + widths] = -8.0  # width logits: the 1/4 bucket
            state.routers[1].fc2.bias[1 + quarter] = 8.0
            out = model(**inputs)
            assert [(c.run, c.bucket[0]) for c in state.calls] == [([False], state.dense_bucket), ([True], quarter)]
            with ec.force(model, skip={0}, width=0.25):
                torch.testing.assert_close(out, model(**inputs))
            assert float((out - original(**inputs)).abs().max()) > 1e-3  # the plan changed the result
            for seed in range(3):
                randomize_routers(model, seed=seed)
                out = model(**inputs)
                calls = [(c.block, c.run[0], c.bucket[0]) for c in state.calls]
                for sample in range(BATCH):
                    alone = _replayed(model, calls, sample_inputs(inputs, sample, BATCH))
                    torch.testing.assert_close(alone, out[sample:sample + 1], atol=1e-5, rtol=1e-5)
    finally:
        for index, router in saved.items():
            state.routers[index].load_state_dict(router.state_dict())


def _replayed(model, calls, inputs):
    """The model on ``inputs`` with every block pinned to the recorded (run, bucket)."""
    gates = []
    for block, run, bucket in calls:
        gate = state_of(model).blocks[block].forward
        gate.routes_everything = lambda: False
        gate.decide = lambda arguments, batch, r=run, b=bucket: ([r] * batch, [b] * batch, False, None, None)
        gates.append(gate)
    try:
        return model(**inputs)
    finally:
        for gate in gates:
            del gate.routes_everything, gate.decide

"""Tiny DiTs written the way public codebases outside diffusers write them (their op patterns, not their code).

Each builder returns ``(model, example_inputs)``; the inputs are keyword arguments with batch ``BATCH``. What
each imitates, and the failure class of issue 24 it carries:

* ``dit`` (facebookresearch/DiT, SiT): fused qkv, timm ``Mlp`` (GELU tanh), adaLN-Zero ``modulate``; the attention
  output is re-laid out with ``transpose(1, 2).view(...)``, legal only on SDPA's token-major result (class 3).
* ``uvit`` (U-ViT): a time token prepended, in-blocks, one mid block, out-blocks fusing the long skip with
  ``skip_linear(cat([x, skip]))`` (class 2).
* ``lightning`` (LightningDiT): RMSNorm, qk-norm, fused SwiGLU, a rotary module handed to every block as
  ``feat_rope=self.feat_rope`` (class 1).
* ``mmdit`` (SD3 reference ``sd3_impls``): dismantled blocks with ``pre_attention`` / ``post_attention``, joint
  attention over concatenated qkv, a last block that only conditions the context (``pre_only``).
* ``pixart_alpha`` (PixArt-alpha's own code): ``t2i_modulate`` with a ``scale_shift_table``, captions flattened
  across the batch to ``(1, sum(lens), C)`` with lengths read by ``.tolist()`` (classes 4 and 6).
* ``stdit`` (Open-Sora STDiT): spatial then temporal attention by re-batching, flattened cross-attention whose
  lengths each block reads itself with ``.tolist()`` (classes 4 and 6 inside the block's graph).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

BATCH = 2
DIM, HEADS = 32, 2


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def t2i_modulate(x, shift, scale):
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq=32):
        super().__init__()
        self.freq = freq
        self.mlp = nn.Sequential(nn.Linear(freq, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        args = t[:, None].float() * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class Mlp(nn.Module):
    """timm's Mlp: fc1 -> act -> fc2."""

    def __init__(self, dim, hidden, act=None):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act or nn.GELU(approximate="tanh"), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Fused SwiGLU (LightningDiT, xformers style): one w12 projection split into value and gate."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    """Fused qkv self-attention. ``layout="view"``: ``transpose(1, 2).view`` after SDPA (DiT/SiT code)."""

    def __init__(self, dim, heads, qk_norm=False, layout="reshape"):
        super().__init__()
        self.heads, self.layout = heads, layout
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x, rope=None):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).view(B, N, C) if self.layout == "view" else x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class PatchEmbed(nn.Module):
    def __init__(self, channels, dim, patch=2):
        super().__init__()
        self.proj = nn.Conv2d(channels, dim, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x, channels, patch=2):
    B, N, _ = x.shape
    h = w = int(N ** 0.5)
    x = x.reshape(B, h, w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(B, channels, h * patch, w * patch)


# -- DiT / SiT ---------------------------------------------------------------------------------------------------
class DiTBlock(nn.Module):
    def __init__(self, dim, heads, layout="view"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, layout=layout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    def __init__(self, depth=3, channels=4, classes=10, block=DiTBlock):
        super().__init__()
        self.channels = channels
        self.x_embedder, self.t_embedder = PatchEmbed(channels, DIM), TimestepEmbedder(DIM)
        self.y_embedder = nn.Embedding(classes + 1, DIM)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, DIM) * 0.02)
        self.blocks = nn.ModuleList([block(DIM, HEADS) for _ in range(depth)])
        self.final = nn.Linear(DIM, 4 * channels)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return unpatchify(self.final(x), self.channels)


def dit(batch=BATCH):
    return DiT().eval(), dict(x=torch.randn(batch, 4, 8, 8), t=torch.rand(batch) * 1000,
                              y=torch.randint(0, 10, (batch,)))


# -- U-ViT -------------------------------------------------------------------------------------------------------
class UViTBlock(nn.Module):
    def __init__(self, dim, heads, skip=False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, 4 * dim, nn.GELU())
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None):
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UViT(nn.Module):
    def __init__(self, depth=2, channels=4):
        super().__init__()
        self.channels = channels
        self.patch_embed, self.time_embed = PatchEmbed(channels, DIM), TimestepEmbedder(DIM)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, DIM) * 0.02)
        self.in_blocks = nn.ModuleList([UViTBlock(DIM, HEADS) for _ in range(depth)])
        self.mid_block = UViTBlock(DIM, HEADS)
        self.out_blocks = nn.ModuleList([UViTBlock(DIM, HEADS, skip=True) for _ in range(depth)])
        self.norm, self.decoder_pred = nn.LayerNorm(DIM), nn.Linear(DIM, 4 * channels)

    def forward(self, x, timesteps):
        x = self.patch_embed(x)
        x = torch.cat([self.time_embed(timesteps).unsqueeze(1), x], dim=1) + self.pos_embed
        skips = []
        for block in self.in_blocks:
            x = block(x)
            skips.append(x)
        x = self.mid_block(x)
        for block in self.out_blocks:
            x = block(x, skips.pop())
        return unpatchify(self.decoder_pred(self.norm(x))[:, 1:], self.channels)


def uvit(batch=BATCH):
    return UViT().eval(), dict(x=torch.randn(batch, 4, 8, 8), timesteps=torch.rand(batch) * 1000)


# -- LightningDiT ------------------------------------------------------------------------------------------------
class VisionRotaryEmbedding(nn.Module):
    """2-D rotary embedding as a module holding its tables, applied to (B, H, N, d) queries and keys."""

    def __init__(self, head_dim, grid=4):
        super().__init__()
        quarter = head_dim // 4
        freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
        pos = torch.arange(grid, dtype=torch.float32)
        fy = (pos[:, None, None] * freqs).expand(grid, grid, quarter)
        fx = (pos[None, :, None] * freqs).expand(grid, grid, quarter)
        angles = torch.cat([fy, fx], dim=-1).reshape(grid * grid, head_dim // 2).repeat_interleave(2, dim=-1)
        self.register_buffer("freqs_cos", angles.cos(), persistent=False)
        self.register_buffer("freqs_sin", angles.sin(), persistent=False)

    def forward(self, t):
        rotated = torch.stack([-t[..., 1::2], t[..., ::2]], dim=-1).flatten(-2)
        return t * self.freqs_cos + rotated * self.freqs_sin


class LightningBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn, self.mlp = Attention(dim, heads, qk_norm=True), SwiGLU(dim, 2 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, feat_rope=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=feat_rope)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class LightningDiT(DiT):
    def __init__(self, depth=3):
        super().__init__(depth=depth, block=LightningBlock)
        self.feat_rope = VisionRotaryEmbedding(DIM // HEADS)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c, feat_rope=self.feat_rope)
        return unpatchify(self.final(x), self.channels)


def lightning(batch=BATCH):
    return LightningDiT().eval(), dict(x=torch.randn(batch, 4, 8, 8), t=torch.rand(batch) * 1000,
                                       y=torch.randint(0, 10, (batch,)))

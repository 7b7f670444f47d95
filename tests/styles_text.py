"""Text-conditioned tiny DiTs in the styles of public codebases outside diffusers (see ``styles.py``): the SD3
reference MMDiT, PixArt-alpha's own code and Open-Sora's STDiT. The last two flatten the captions across the
batch, ``(1, sum(lens), C)``, and build xformers-style block-diagonal attention from per-sample lengths."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from styles import BATCH, DIM, HEADS, Attention, Mlp, PatchEmbed, TimestepEmbedder, modulate, t2i_modulate, unpatchify

TEXT, TEXT_DIM = 5, 12


def block_diagonal_bias(q_lens: list[int], kv_lens: list[int]) -> torch.Tensor:
    """``BlockDiagonalMask.from_seqlens(q_lens, kv_lens)`` as an additive bias: query segment i sees key segment i."""
    q_ids = torch.repeat_interleave(torch.arange(len(q_lens)), torch.tensor(q_lens))
    kv_ids = torch.repeat_interleave(torch.arange(len(kv_lens)), torch.tensor(kv_lens))
    return torch.zeros(len(q_ids), len(kv_ids)).masked_fill(q_ids[:, None] != kv_ids[None, :], float("-inf"))


class MultiHeadCrossAttention(nn.Module):
    """PixArt-alpha / Open-Sora cross-attention: the batch's queries and captions as one sequence each."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q_linear, self.kv_linear, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)

    def forward(self, x, cond, lens):
        B, N, C = x.shape
        d = C // self.heads
        q = self.q_linear(x).view(1, -1, self.heads, d).transpose(1, 2)
        k, v = self.kv_linear(cond).view(1, -1, 2, self.heads, d).unbind(2)
        bias = block_diagonal_bias([N] * B, lens)
        x = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def flatten_captions(y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(B, L, C) captions and their (B, L) mask -> the valid tokens of all samples as (1, sum(lens), C)."""
    lens = mask.sum(dim=1).tolist()
    return y.masked_select(mask.unsqueeze(-1) != 0).view(1, -1, y.shape[-1]), lens


def caption_mask(batch: int) -> torch.Tensor:
    """Per-sample caption lengths that differ (5, 3, 4, ...)."""
    lens = [TEXT - (i % 3) * 1 - (i % 2) for i in range(batch)]
    return (torch.arange(TEXT)[None, :] < torch.tensor(lens)[:, None]).long()


# -- PixArt-alpha ------------------------------------------------------------------------------------------------
class PixArtBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.cross_attn = MultiHeadCrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, mask=None):
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, mask)
        return x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))


class PixArtAlpha(nn.Module):
    def __init__(self, depth=2, channels=4):
        super().__init__()
        self.channels = channels
        self.x_embedder, self.t_embedder = PatchEmbed(channels, DIM), TimestepEmbedder(DIM)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))
        self.y_embedder = nn.Sequential(nn.Linear(TEXT_DIM, DIM), nn.GELU(approximate="tanh"), nn.Linear(DIM, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, 16, DIM) * 0.02)
        self.blocks = nn.ModuleList([PixArtBlock(DIM, HEADS) for _ in range(depth)])
        self.final = nn.Linear(DIM, 4 * channels)

    def forward(self, x, timestep, y, mask):
        x = self.x_embedder(x) + self.pos_embed
        t0 = self.t_block(self.t_embedder(timestep))
        y, y_lens = flatten_captions(self.y_embedder(y.squeeze(1)), mask)
        for block in self.blocks:
            x = block(x, y, t0, y_lens)
        return unpatchify(self.final(x), self.channels)


def pixart_alpha(batch=BATCH):
    return PixArtAlpha().eval(), dict(x=torch.randn(batch, 4, 8, 8), timestep=torch.rand(batch) * 1000,
                                      y=torch.randn(batch, 1, TEXT, TEXT_DIM), mask=caption_mask(batch))


# -- Open-Sora STDiT ---------------------------------------------------------------------------------------------
class STDiTBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn, self.attn_temp = Attention(dim, heads), Attention(dim, heads)
        self.cross_attn = MultiHeadCrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def forward(self, x, y, t, mask, T, S):
        B, N, C = x.shape
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t.reshape(B, 6, -1)).chunk(6, dim=1)
        x_m = t2i_modulate(self.norm1(x), shift_msa, scale_msa)
        x_s = self.attn(x_m.reshape(B * T, S, C)).reshape(B, T * S, C)            # (B T) S C: spatial
        x = x + gate_msa * x_s
        x_t = x.reshape(B, T, S, C).transpose(1, 2).reshape(B * S, T, C)           # (B S) T C: temporal
        x_t = self.attn_temp(x_t).reshape(B, S, T, C).transpose(1, 2).reshape(B, T * S, C)
        x = x + gate_msa * x_t
        x = x + self.cross_attn(x, y, mask.sum(dim=1).tolist())                   # lengths read in the block
        return x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp))


class STDiT(nn.Module):
    def __init__(self, depth=2, channels=4, frames=2):
        super().__init__()
        self.channels, self.frames = channels, frames
        self.x_embedder = nn.Conv3d(channels, DIM, (1, 2, 2), (1, 2, 2))
        self.t_embedder = TimestepEmbedder(DIM)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(DIM, 6 * DIM))
        self.y_embedder = nn.Sequential(nn.Linear(TEXT_DIM, DIM), nn.GELU(approximate="tanh"), nn.Linear(DIM, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, 16, DIM) * 0.02)
        self.blocks = nn.ModuleList([STDiTBlock(DIM, HEADS) for _ in range(depth)])
        self.final = nn.Linear(DIM, 4 * channels)

    def forward(self, x, timestep, y, mask):
        B, _, T, H, W = x.shape
        S = (H // 2) * (W // 2)
        x = self.x_embedder(x).flatten(3).transpose(1, 2).transpose(2, 3)          # B T S C
        x = (x + self.pos_embed[:, None]).reshape(B, T * S, DIM)
        t0 = self.t_block(self.t_embedder(timestep))
        y, _ = flatten_captions(self.y_embedder(y.squeeze(1)), mask)
        for block in self.blocks:
            x = block(x, y, t0, mask, T, S)
        x = self.final(x).reshape(B * T, S, -1)
        x = unpatchify(x, self.channels).reshape(B, T, self.channels, H, W)
        return x.transpose(1, 2)


def stdit(batch=BATCH):
    return STDiT().eval(), dict(x=torch.randn(batch, 4, 2, 8, 8), timestep=torch.rand(batch) * 1000,
                                y=torch.randn(batch, 1, TEXT, TEXT_DIM), mask=caption_mask(batch))


# -- SD3 reference MMDiT -----------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def pre_attention(self, x):
        B, L, C = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, -1).movedim(2, 0)
        return q.reshape(B, L, -1), k.reshape(B, L, -1), v.reshape(B, L, -1)

    def post_attention(self, x):
        return self.proj(x)


class DismantledBlock(nn.Module):
    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(dim, heads, pre_only)
        if not pre_only:
            self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(dim, 4 * dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, (2 if pre_only else 6) * dim))

    def pre_attention(self, x, c):
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
        return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def attention(q, k, v, heads):
    B, L, C = q.shape
    q, k, v = (t.view(B, L, heads, -1).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)


def block_mixing(context, x, context_block, x_block, c):
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    x_qkv, x_intermediates = x_block.pre_attention(x, c)
    q, k, v = (torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3))
    attn = attention(q, k, v, x_block.attn.heads)
    context_attn, x_attn = attn[:, :context.shape[1]], attn[:, context.shape[1]:]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    return context, x_block.post_attention(x_attn, *x_intermediates)


class JointBlock(nn.Module):
    def __init__(self, dim, heads, pre_only=False):
        super().__init__()
        self.context_block = DismantledBlock(dim, heads, pre_only)
        self.x_block = DismantledBlock(dim, heads)

    def forward(self, context, x, c):
        return block_mixing(context, x, self.context_block, self.x_block, c)


class MMDiT(nn.Module):
    def __init__(self, depth=3, channels=4):
        super().__init__()
        self.channels = channels
        self.x_embedder, self.t_embedder = PatchEmbed(channels, DIM), TimestepEmbedder(DIM)
        self.y_embedder = nn.Sequential(nn.Linear(TEXT_DIM, DIM), nn.SiLU(), nn.Linear(DIM, DIM))
        self.context_embedder = nn.Linear(TEXT_DIM, DIM)
        self.pos_embed = nn.Parameter(torch.randn(1, 16, DIM) * 0.02)
        self.joint_blocks = nn.ModuleList([JointBlock(DIM, HEADS, pre_only=i == depth - 1) for i in range(depth)])
        self.final = nn.Linear(DIM, 4 * channels)

    def forward(self, x, t, y, context):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.joint_blocks:
            context, x = block(context, x, c=c)
        return unpatchify(self.final(x), self.channels)


def mmdit(batch=BATCH):
    return MMDiT().eval(), dict(x=torch.randn(batch, 4, 8, 8), t=torch.rand(batch) * 1000,
                                y=torch.randn(batch, TEXT_DIM), context=torch.randn(batch, TEXT, TEXT_DIM))


STYLES = {}  # filled below: name -> builder, for parametrized tests


def _register():
    import styles
    STYLES.update(dit=styles.dit, uvit=styles.uvit, lightning=styles.lightning, mmdit=mmdit,
                  pixart_alpha=pixart_alpha, stdit=stdit)


_register()

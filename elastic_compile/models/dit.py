"""A hand-written adaLN-Zero DiT in the style of the original DiT code (Peebles & Xie, 2023).

This is the project's reference *architecture* for speed benchmarks and tests: plain PyTorch, a timm-like
``Mlp`` (fc1 -> GELU(tanh) -> fc2), no diffusers. elastic_compile never special-cases it: it is just one more
unmodified DiT that ``transform`` must understand from its graph.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

# Named shapes from the DiT paper (hidden, depth, heads) plus the toolkit's tiny test shape.
_SHAPES = {
    "tiny": (32, 2, 2),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def dit_config(shape: str, **overrides) -> dict:
    """Constructor arguments of :class:`DiT` for a named shape ("tiny", "S", "B", "L", "XL")."""
    hidden, depth, heads = _SHAPES[shape]
    config = dict(hidden_size=hidden, depth=depth, num_heads=heads)
    config.update(overrides)
    return config


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class DiTBlock(nn.Module):
    """adaLN-Zero block: attention and MLP, each modulated and gated by the conditioning vector ``c``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class DiT(nn.Module):
    """Class-conditional latent DiT: ``forward(x, t, y) -> prediction`` with x of shape (B, C, H, W).

    ``y == num_classes`` is the null class used for classifier-free guidance.
    """

    def __init__(self, input_size: int = 32, patch_size: int = 2, in_channels: int = 4, hidden_size: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 learn_sigma: bool = False):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.grid = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_size)
        self.register_buffer("pos_embed", _sincos_pos_embed(hidden_size, self.grid), persistent=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)

    def forward(self, x, t, y):
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_modulation(c).chunk(2, dim=1)
        tokens = self.final_linear(_modulate(self.final_norm(tokens), shift, scale))
        return self._unpatchify(tokens)

    def _unpatchify(self, tokens):
        p, g, c = self.patch_size, self.grid, self.out_channels
        x = tokens.reshape(tokens.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(tokens.shape[0], c, g * p, g * p)


def _sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    coords = torch.arange(grid, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)

    def embed(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    emb = torch.cat([embed(yy), embed(xx)], dim=1)
    if emb.shape[1] < dim:
        emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.unsqueeze(0)


def dit_s2() -> DiT:
    """DiT-S/2 on 32x32x4 latents (256 tokens), 1000 classes: importable as ``elastic_compile.models.dit:dit_s2``
    (an export ``base_factory``)."""
    return DiT(input_size=32, patch_size=2, in_channels=4, num_classes=1000, **dit_config("S")).eval()


def dit_b2() -> DiT:
    """DiT-B/2 on 32x32x4 latents (256 tokens), 1000 classes: ``elastic_compile.models.dit:dit_b2``."""
    return DiT(input_size=32, patch_size=2, in_channels=4, num_classes=1000, **dit_config("B")).eval()

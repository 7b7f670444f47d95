"""Hand-written DiT variants that no part of elastic_compile was written against."""
import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class SwiGLU(nn.Module):
    """LLaMA-style: separate gate and up projections."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class FusedGEGLU(nn.Module):
    """One projection to 2H, split into value and gate."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)
        self.out = nn.Linear(hidden, dim)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(value * F.gelu(gate))


class PlainLinearSubclass(nn.Linear):
    def forward(self, x):  # e.g. a quantized or LoRA linear with its own forward
        return super().forward(x)


class CustomLinearMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = PlainLinearSubclass(dim, hidden)
        self.fc2 = PlainLinearSubclass(hidden, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class Layer(nn.Module):
    """Pre-norm block, timestep-scaled residuals; ``parallel`` runs attention and MLP side by side."""

    def __init__(self, dim, heads, mlp, parallel=False):
        super().__init__()
        self.heads, self.parallel = heads, parallel
        self.norm = RMSNorm(dim)
        self.norm_mlp = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.mlp = mlp
        self.scale = nn.Linear(dim, 2 * dim)

    def attention(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(b, n, d))

    def forward(self, tokens, cond):
        gate_attn, gate_mlp = self.scale(cond).unsqueeze(1).chunk(2, dim=-1)
        if self.parallel:
            h = self.norm(tokens)
            return tokens + gate_attn * self.attention(h) + gate_mlp * self.mlp(h)
        tokens = tokens + gate_attn * self.attention(self.norm(tokens))
        return tokens + gate_mlp * self.mlp(self.norm_mlp(tokens))


class UnseenDiT(nn.Module):
    def __init__(self, mlp="swiglu", depth=3, dim=32, heads=4, hidden=48, parallel=False):
        super().__init__()
        make = {"swiglu": SwiGLU, "geglu": FusedGEGLU, "custom": CustomLinearMlp}[mlp]
        self.embed = nn.Linear(6, dim)
        self.time = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.layers = nn.ModuleList(Layer(dim, heads, make(dim, hidden), parallel) for _ in range(depth))
        self.head = nn.Linear(dim, 6)

    def forward(self, sample, sigma):
        cond = self.time(sigma[:, None])
        tokens = self.embed(sample)
        for layer in self.layers:
            tokens = layer(tokens, cond)
        return self.head(tokens)


def build(mlp="swiglu", parallel=False, batch=2, seed=0):
    torch.manual_seed(seed)
    model = UnseenDiT(mlp=mlp, parallel=parallel).eval()
    return model, dict(sample=torch.randn(batch, 10, 6), sigma=torch.rand(batch))

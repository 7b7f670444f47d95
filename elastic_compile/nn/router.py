"""The per-block router: reads a block's inputs, outputs a run logit and width-bucket logits per sample."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..analysis.spec import RouterFeature

# "Full capacity" initialisation: an untrained router runs every block at full width with margin.
RUN_LOGIT_INIT = 4.0
FULL_WIDTH_LOGIT_INIT = 4.0


class Router(nn.Module):
    """LayerNorm'd features (mean-pooled token streams, conditioning vectors, sinusoidal scalars) -> small MLP.

    ``forward(arguments)`` takes the block's arguments by name and returns ``(run_logit (B,), width_logits
    (B, K))``. Its last layer starts at zero weight with biases that choose "run at full width", so the rewritten
    model reproduces the dense one until routers are trained.
    """

    def __init__(self, features: list[RouterFeature], hidden: int, num_widths: int):
        super().__init__()
        self.features = list(features)
        self.num_widths = num_widths
        self.norms = nn.ModuleList(nn.LayerNorm(f.dim) for f in self.features)
        self.fc1 = nn.Linear(self.in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1 + num_widths)
        scalar_dims = {f.dim for f in self.features if f.kind == "scalar"}
        freqs = scalar_dims.pop() // 2 if scalar_dims else 16
        self.register_buffer("frequencies", torch.logspace(-3, math.log10(30.0), freqs), persistent=False)
        self.reset_to_full_capacity()

    @property
    def in_features(self) -> int:
        return sum(f.dim for f in self.features)

    def reset_to_full_capacity(self) -> None:
        nn.init.zeros_(self.fc2.weight)
        with torch.no_grad():
            self.fc2.bias.zero_()
            self.fc2.bias[0] = RUN_LOGIT_INIT
            self.fc2.bias[-1] = FULL_WIDTH_LOGIT_INIT if self.num_widths > 1 else 0.0

    def flops_per_sample(self) -> int:
        """Matmul FLOPs per sample, counted like torch.utils.flop_counter (2 * m * n * k)."""
        return 2 * (self.in_features * self.fc1.out_features + self.fc1.out_features * self.fc2.out_features)

    def featurize(self, arguments: dict) -> torch.Tensor:
        # Few dispatcher calls on purpose: a router runs between two blocks, where every tiny op is several times
        # slower than in a warm loop (instruction and data caches just evicted by the block's GEMMs).
        dtype = self.fc1.weight.dtype
        parts = []
        for feature, norm in zip(self.features, self.norms):
            value = arguments[feature.name]
            if feature.kind == "scalar":
                angles = value.float().reshape(-1, 1) * self.frequencies.float()[None]
                x = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
            elif feature.kind == "pooled" and value.ndim > 2:
                # mean(dtype=float32) accumulates in float32 without materialising a float32 copy of the stream
                dims = tuple(range(1, value.ndim - 1))
                x = value.mean(dim=dims) if value.dtype == torch.float32 else value.mean(dim=dims, dtype=torch.float32)
            else:
                x = value if value.ndim == 2 else value.reshape(value.shape[0], -1)
            if x.dtype != dtype:
                x = x.to(dtype)
            parts.append(F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def logits(self, arguments: dict) -> torch.Tensor:
        """``(B, 1 + num_widths)``: the run logit, then the width-bucket logits (one tensor, one transfer)."""
        return self.fc2(F.silu(self.fc1(self.featurize(arguments))))

    def forward(self, arguments: dict) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(arguments)
        return logits[:, 0], logits[:, 1:]


def router_hidden_size(features: list[RouterFeature], num_widths: int, block_params: int, preferred: int,
                       minimum: int, param_budget: float) -> int:
    """Largest hidden width <= ``preferred`` whose router stays within ``param_budget`` of the block."""
    in_dim = sum(f.dim for f in features)
    fixed = 2 * in_dim + 1 + num_widths  # layer norms + output bias
    per_hidden = in_dim + 1 + 1 + num_widths
    fitting = int((param_budget * block_params - fixed) // per_hidden)
    return max(minimum, min(preferred, fitting))

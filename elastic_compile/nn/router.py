"""The per-block router: reads a block's inputs, outputs a run logit and width-bucket logits per sample."""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..analysis.spec import RouterFeature
from ..errors import InputMismatchError
from .decision_memo import DecisionMemo, memo_for
from .memo import TensorMemo

# "Full capacity" initialisation: an untrained router runs every block at full width with margin.
RUN_LOGIT_INIT = 4.0
FULL_WIDTH_LOGIT_INIT = 4.0

#: Layer-normalised vector and scalar features (a conditioning vector, a timestep: read by every block's router),
#: shared by all routers of the process for the tensor they were computed from (see :mod:`.memo`: identity,
#: version; tagged by the LayerNorm epsilon, the router's dtype and, for a scalar, its frequency count).
SHARED_VECTORS = TensorMemo()
#: Weight dtypes the router computes in directly (others, e.g. float8 under diffusers' layerwise casting, are
#: storage only: the router then calls its modules, whose casting hooks bring the weights to the compute dtype).
FOLDABLE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: The name diffusers' ``enable_layerwise_casting`` gives its hook on each cast module (read for the compute dtype).
LAYERWISE_CASTING_HOOK = "layerwise_casting"


class Router(nn.Module):
    """LayerNorm'd features (mean-pooled token streams, conditioning vectors, sinusoidal scalars) -> small MLP.

    ``forward(arguments)`` takes the block's arguments by name and returns ``(run_logit (B,), width_logits
    (B, K))``, and with ``num_actions`` skip actions also ``action_logits (B, A)``: which stand-in a skipped
    sample takes (``ElasticConfig.skip_actions``). Its last layer starts at zero weight with biases that choose
    "run at full width" (and the first skip action), so the rewritten model reproduces the dense one until
    routers are trained. ``logits`` returns all of them as one ``(B, 1 + K + A)`` tensor.

    On CPU without gradients, ``logits`` runs the same function with fewer operations between two blocks (where
    each one is several times slower than in a warm loop): the LayerNorms' affine parameters folded into ``fc1``
    (:meth:`folded`, refreshed whenever a parameter changes) and vector and scalar features normalised once per
    tensor for all routers (:data:`SHARED_VECTORS`). Equal to the training path up to float32 rounding. Not on
    accelerators: a CUDA graph captured through a memo hit would replay a stale value. Nor when diffusers hooks sit
    on the router's own modules (layerwise casting stores float8 weights and casts them at each module call; leaf
    level group offloading brings each module's weights to its device, or back from disk, only when the module is
    called): the router then calls its modules, so their hooks run.
    """

    def __init__(self, features: list[RouterFeature], hidden: int, num_widths: int, num_actions: int = 0):
        super().__init__()
        self.features = list(features)
        self.num_widths = num_widths
        self.num_actions = num_actions
        self.norms = nn.ModuleList(nn.LayerNorm(f.dim) for f in self.features)
        self.fc1 = nn.Linear(self.in_features, hidden)
        self.fc2 = nn.Linear(hidden, 1 + num_widths + num_actions)
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
            self.fc2.bias[self.num_widths] = FULL_WIDTH_LOGIT_INIT if self.num_widths > 1 else 0.0

    def flops_per_sample(self) -> int:
        """Matmul FLOPs per sample, counted like torch.utils.flop_counter (2 * m * n * k)."""
        return 2 * (self.in_features * self.fc1.out_features + self.fc1.out_features * self.fc2.out_features)

    def featurize(self, arguments: dict) -> torch.Tensor:
        # Few dispatcher calls on purpose: a router runs between two blocks, where every tiny op is several times
        # slower than in a warm loop (instruction and data caches just evicted by the block's GEMMs).
        dtype = self.compute_dtype()
        parts = [_layer_norm(norm, self._raw_feature(feature, arguments[feature.name], dtype))
                 for feature, norm in zip(self.features, self.norms)]
        if len(parts) == 1:
            return parts[0]
        batch = max(part.shape[0] for part in parts)
        return torch.cat([_broadcast_rows(part, batch) for part in parts], dim=-1)

    def folds(self) -> bool:
        """Whether :meth:`logits` takes the folded path (CPU, no gradients, weights computed in directly, no
        diffusers hooks on the router's modules)."""
        weight = self.fc1.weight
        return not (torch.is_grad_enabled() or weight.dtype not in FOLDABLE_DTYPES or weight.device.type != "cpu"
                    or self.hooked())

    def decision_memo(self) -> DecisionMemo | None:
        """Where the host gate keeps this router's decisions per timestep value (:mod:`.decision_memo`): for a
        router that reads scalar features only, on the folded path; else None."""
        if type(self).logits is not Router.logits or "logits" in self.__dict__ or not self.folds():
            return None
        return self.folded()["decisions"]

    def logits(self, arguments: dict) -> torch.Tensor:
        """``(B, 1 + num_widths + num_actions)``: the run logit, the width-bucket logits, then the skip-action
        logits (one tensor, one transfer)."""
        if not self.folds():
            return self.plain_logits(arguments)
        folded = self.folded()
        hidden, dtype = folded["fc1_bias"], folded["dtype"]
        for feature, weight, eps in folded["fc1"]:
            value = arguments[feature.name]
            if feature.kind == "pooled" and value.ndim == 3 and value.dtype == dtype:  # the common case, inline
                # LayerNorm is scale invariant: LN(sum, eps * n^2) == LN(mean, eps); right after a block a sum
                # is the cheaper reduction.
                tokens = value.shape[1]
                normed = F.layer_norm(value.sum(1), (feature.dim,), None, None, eps * tokens * tokens)
            else:
                normed = self.normalized(feature, value, eps, dtype)
            if hidden.ndim == 1 or hidden.shape[0] == normed.shape[0]:
                hidden = torch.addmm(hidden, normed, weight)
            else:  # one row for the whole batch (a (1,) timestep): broadcast, as the dense model does
                batch = max(hidden.shape[0], normed.shape[0])
                hidden = _broadcast_rows(hidden, batch) + _broadcast_rows(normed, batch) @ weight
        if folded["unread"]:  # features whose weights are all zero add nothing, but still set the batch
            rows = hidden[None] if hidden.ndim == 1 else hidden
            batch = max([rows.shape[0]] + [feature_rows(f, arguments[f.name]) for f in folded["unread"]])
            hidden = _broadcast_rows(rows, batch)
        return torch.addmm(folded["fc2_bias"], F.silu(hidden), folded["fc2"])

    def plain_logits(self, arguments: dict) -> torch.Tensor:
        """The router as trained (and as exported to ONNX): features, LayerNorms, fc1, SiLU, fc2."""
        return self.fc2(F.silu(self.fc1(self.featurize(arguments))))

    def normalized(self, feature: RouterFeature, value: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        """One feature after its LayerNorm without the affine step (as ``featurize`` computes it)."""
        if feature.kind in ("vector", "scalar"):  # one tensor read by every block's router: normalised once
            tag = (eps, dtype) if feature.kind == "vector" else (eps, dtype, "scalar", self.frequencies.shape[0])
            cached = SHARED_VECTORS.lookup(value, tag)
            if cached is not None:
                return cached
            normed = F.layer_norm(self._raw_feature(feature, value, dtype), (feature.dim,), eps=eps)
            SHARED_VECTORS.remember(value, tag, normed)
            return normed
        return F.layer_norm(self._raw_feature(feature, value, dtype), (feature.dim,), eps=eps)

    def hooked(self) -> bool:
        """Whether diffusers hooks sit on the router's modules (layerwise casting, leaf-level group offloading):
        their weights are then only valid inside the module's own call."""
        for module in (self.fc1, self.fc2, *self.norms):
            registry = module.__dict__.get("_diffusers_hook")
            if registry is not None and registry.hooks:
                return True
        return False

    def folded(self) -> dict:
        """Inference weights: per feature ``(feature, (W_i * gamma_i)^T, eps_i)``, ``fc1_bias = b + sum_i W_i
        beta_i``, ``fc2`` transposed; features whose ``W_i`` is all zero are listed as ``unread`` (they only
        give the batch size). Rebuilt when a parameter's version counter moved (in-place updates,
        ``load_state_dict``), after ``to()`` / ``double()`` / ``cuda()`` (``_apply``), and when a parameter's
        storage was replaced through ``.data`` (which moves no version counter: diffusers' group offloading
        onloads that way, to another device or from disk). ``decisions``: the host gate's memo of decisions per
        timestep value for a router that reads scalar features only (:mod:`.decision_memo`), else None; rebuilt
        with the weights."""
        folded = self.__dict__.get("_folded")
        if folded is not None and folded["versions"] == [p._version for p in folded["parameters"]] \
                and folded["storages"] == [p.data_ptr() for p in folded["parameters"]] \
                and folded["dtype"] == self.fc1.weight.dtype:
            return folded
        with torch.no_grad():
            weight, bias, blocks, unread, start = self.fc1.weight, self.fc1.bias.clone(), [], [], 0
            for feature, norm in zip(self.features, self.norms):
                w = weight[:, start:start + feature.dim]
                start += feature.dim
                if not bool(w.any()):  # e.g. a schedule router's per-sample features: nothing to compute
                    unread.append(feature)
                    continue
                bias += w @ norm.bias
                blocks.append((feature, (w * norm.weight[None]).t().contiguous(), float(norm.eps)))
            parameters = list(self.parameters())
            self._folded = dict(fc1=blocks, unread=unread, fc1_bias=bias, fc2=self.fc2.weight.t().contiguous(),
                                decisions=memo_for([block[0] for block in blocks], unread, feature_rows),
                                fc2_bias=self.fc2.bias.detach().clone(),
                                dtype=weight.dtype,
                                parameters=parameters, versions=[p._version for p in parameters],
                                storages=[p.data_ptr() for p in parameters])
        return self._folded

    def compute_dtype(self) -> torch.dtype:
        """The dtype the router computes in: its weights', or under diffusers' layerwise casting (weights stored in
        a narrower dtype such as float8 and cast at each module call) the casting's compute dtype."""
        registry = getattr(self.fc1, "_diffusers_hook", None)
        casting = registry.get_hook(LAYERWISE_CASTING_HOOK) if registry is not None else None
        return getattr(casting, "compute_dtype", None) or self.fc1.weight.dtype

    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_folded", None)  # new storage or dtype: fold again
        return super()._apply(fn, recurse)

    def _raw_feature(self, feature: RouterFeature, value: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.fc1.weight.dtype
        if feature.kind == "scalar":
            angles = value.float().reshape(-1, 1) * self.frequencies.float()[None]
            x = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        elif feature.kind == "pooled" and value.ndim > 2:
            dims = tuple(range(1, value.ndim - 1))
            x = value.mean(dim=dims) if value.dtype == torch.float32 else value.mean(dim=dims, dtype=torch.float32)
        else:
            x = value if value.ndim == 2 else value.reshape(value.shape[0], -1)
        return x if x.dtype == dtype else x.to(dtype)

    def forward(self, arguments: dict) -> tuple[torch.Tensor, ...]:
        return split_logits(self.plain_logits(arguments), self.num_widths, self.num_actions)


def split_logits(logits: torch.Tensor, num_widths: int, num_actions: int) -> tuple[torch.Tensor, ...]:
    """``(run (B,), widths (B, K))`` of a router's ``(B, 1 + K + A)`` logits, and ``actions (B, A)`` when the
    router has an action head (A > 0): what :meth:`Router.forward` returns (and an exported router graph)."""
    run, widths = logits[:, 0], logits[:, 1:1 + num_widths]
    return (run, widths, logits[:, 1 + num_widths:]) if num_actions else (run, widths)


def feature_rows(feature: RouterFeature, value: torch.Tensor) -> int:
    """How many rows ``featurize`` makes of ``value`` (a scalar feature: one per element)."""
    if feature.kind == "scalar" or value.ndim == 0:
        return max(1, value.numel())
    return value.shape[0]


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    # stored narrower (the module casts) or hooked (offloaded: the module's call brings its weights)
    if (norm.weight is not None and norm.weight.dtype not in FOLDABLE_DTYPES) or "_diffusers_hook" in norm.__dict__:
        return norm(x)
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _broadcast_rows(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """``rows`` with ``batch`` rows: as it is, or its single row repeated (a per-batch feature)."""
    if rows.shape[0] == batch:
        return rows
    if rows.shape[0] != 1:
        raise InputMismatchError(f"router inputs with {batch} rows (the batch) or 1", f"{rows.shape[0]} rows",
                                 "Give every batched argument of the model the same batch size.")
    return rows.expand(batch, -1)


def router_hidden_size(features: list[RouterFeature], num_outputs: int, block_params: int, preferred: int,
                       minimum: int, param_budget: float) -> int:
    """Largest hidden width <= ``preferred`` whose router stays within ``param_budget`` of the block
    (``num_outputs``: width buckets plus skip actions, besides the run logit)."""
    in_dim = sum(f.dim for f in features)
    fixed = 2 * in_dim + 1 + num_outputs  # layer norms + output bias
    per_hidden = in_dim + 1 + 1 + num_outputs
    fitting = int((param_budget * block_params - fixed) // per_hidden)
    return max(minimum, min(preferred, fitting))

"""A router evaluated in NumPy on the host: what CPU runtimes run between two block graphs.

Between two ONNX Runtime calls, a PyTorch router pays for PyTorch's whole dispatch path with cold caches (the
block just streamed its weights through them) and must be kept off PyTorch's thread pool; the same arithmetic in
NumPy, with the token mean taken from the block graph (see :mod:`.summaries`), costs a fraction of that. :class:`HostRouter` computes exactly :meth:`Router.logits <elastic_compile.nn.router.Router.logits>`
(float32, from the router's folded weights :meth:`Router.folded <elastic_compile.nn.router.Router.folded>`, so
results match to rounding) and re-reads them whenever a parameter of the PyTorch router has changed, so
``load_state_dict``, training or ``reset_to_full_capacity`` on the PyTorch router are always what runs.
"""
from __future__ import annotations

import numpy as np
import torch

from ..nn.call_router import CallRouter
from ..nn.decision_memo import DecisionMemo, memo_for
from ..nn.router import Router, feature_rows, split_logits
from .lookahead import ExportedWeights, LookaheadLogits
from .summaries import PooledSummaries

# OpenBLAS runs a float32 GEMM on its own thread pool above m*n*k = 65536 * 4; those threads would spin on the
# cores the block graphs run on. Router products are split into row chunks that stay below that size.
SINGLE_THREAD_GEMM = 65536 * 4
NUMPY_DTYPES = {torch.float32, torch.float64, torch.float16, torch.int64, torch.int32, torch.int16, torch.int8,
                torch.uint8, torch.bool}


class HostRouter:
    """``logits(arguments) -> (B, 1 + K + A)`` float32 tensor (and ``__call__`` -> ``(run, widths[, actions])``, as
    the router's forward), on CPU."""

    def __init__(self, router: Router, summaries: PooledSummaries | None = None,
                 lookahead: LookaheadLogits | None = None, block: int | None = None):
        self.router = router
        self.summaries = summaries
        self.features = list(router.features)
        self.names = [feature.name for feature in self.features]
        self._source = None
        # logits the previous block's graph computed for this router, while it holds the exported weights
        self.lookahead = lookahead
        self.block = block
        self.exported = ExportedWeights(router) if lookahead is not None else None

    def _weights(self) -> dict:
        """The PyTorch router's folded weights (:meth:`Router.folded`, refreshed on any change) as float32 arrays."""
        folded = self.router.folded()
        if folded is not self._source:
            host = lambda t: np.ascontiguousarray(t.detach().float().cpu().numpy())
            self._folded = dict(fc1=[(feature, host(w), eps) for feature, w, eps in folded["fc1"]],
                                unread=list(folded["unread"]), fc1_bias=host(folded["fc1_bias"]),
                                fc2=host(folded["fc2"]), fc2_bias=host(folded["fc2_bias"]),
                                frequencies=host(self.router.frequencies),
                                decisions=memo_for([block[0] for block in folded["fc1"]], folded["unread"],
                                                   feature_rows))
            self._source = folded
        return self._folded

    def feature(self, feature, value: torch.Tensor, frequencies: np.ndarray) -> np.ndarray:
        """The feature's float32 ``(B, dim)`` array before its LayerNorm (as ``Router.featurize``)."""
        if feature.kind == "pooled" and value.ndim > 2:
            array = _host(value)
            tokens = array.size // (array.shape[0] * array.shape[-1])
            return np.add.reduce(array, axis=tuple(range(1, array.ndim - 1)), dtype=np.float32) * np.float32(1 / tokens)
        if feature.kind == "scalar":
            angles = _float32(_host(value)).reshape(-1, 1) * frequencies[None]
            return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)
        array = _host(value)
        return _float32(array.reshape(array.shape[0], -1))

    def normalized(self, feature, value: torch.Tensor, eps: float, frequencies: np.ndarray) -> np.ndarray:
        """The feature after its LayerNorm without the affine step (folded into fc1). A token stream's comes
        from the block graph's summary when there is one for ``value``; a vector or scalar feature (the
        conditioning vector, the timestep, read by every block's router) is normalised once per tensor and shared
        by all routers that read it (see :mod:`.summaries`); else computed here."""
        if feature.kind == "scalar":  # its sinusoidal features depend on the frequency count too
            kind = f"scalar/{frequencies.shape[0]}"
        else:
            kind = "pooled" if feature.kind == "pooled" and value.ndim > 2 else "vector"
        if kind is not None and self.summaries is not None:
            summary = self.summaries.lookup(value, eps, kind)
            if summary is not None:
                return summary
        x = self.feature(feature, value, frequencies)
        # np.add.reduce, not ndarray.mean: mean's Python-level wrapper is slow right after a block (cold caches)
        scale = np.float32(1 / x.shape[-1])
        centred = x - np.add.reduce(x, axis=-1, keepdims=True) * scale
        normed = centred / np.sqrt(np.add.reduce(centred * centred, axis=-1, keepdims=True) * scale + np.float32(eps))
        if kind is not None and self.summaries is not None:
            self.summaries.remember(value, normed, eps, kind)
        return normed

    def decision_memo(self) -> DecisionMemo | None:
        """The host gate's memo of this router's decisions per timestep value (:mod:`elastic_compile.nn.
        decision_memo`): for a router that reads scalar features only and whose logits no block graph computes
        ahead; else None."""
        if self.lookahead is not None or isinstance(self.router, CallRouter):
            return None
        return self._weights()["decisions"]

    def logits(self, arguments: dict) -> torch.Tensor:
        if self.lookahead is not None and self.exported.current():
            ahead = self.lookahead.lookup(self.block, [arguments.get(name) for name in self.names])
            if ahead is not None:
                return ahead
        if isinstance(self.router, CallRouter):  # streams without a batch axis: the call is one sample
            arguments = self.router.one_row(arguments)
        weights = self._weights()
        hidden = None
        for feature, w, eps in weights["fc1"]:
            term = _matmul(self.normalized(feature, arguments[feature.name], eps, weights["frequencies"]), w)
            hidden = term if hidden is None else hidden + term
        if weights["unread"]:  # features with all-zero weights (Router.folded) add nothing but set the batch
            batch = max([0 if hidden is None else hidden.shape[0]]
                        + [feature_rows(f, arguments[f.name]) for f in weights["unread"]])
            if hidden is None:
                hidden = np.zeros((batch, weights["fc1_bias"].shape[0]), np.float32)
            elif hidden.shape[0] != batch:  # one row for the whole batch (as Router.logits broadcasts it)
                hidden = np.repeat(hidden, batch, axis=0)
        hidden += weights["fc1_bias"]
        hidden *= 0.5 * (1.0 + np.tanh(0.5 * hidden))  # SiLU, x * sigmoid(x), without overflow
        out = _matmul(hidden, weights["fc2"])
        out += weights["fc2_bias"]
        return torch.from_numpy(out)

    @property
    def num_widths(self) -> int:
        return self.router.num_widths

    @property
    def num_actions(self) -> int:
        return self.router.num_actions

    def __call__(self, arguments: dict) -> tuple[torch.Tensor, ...]:
        return split_logits(self.logits(arguments), self.router.num_widths, self.router.num_actions)


def _host(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor (one PyTorch call: ``numpy(force=True)`` detaches and resolves lazily)."""
    if tensor.dtype not in NUMPY_DTYPES:
        tensor = tensor.float()
    return tensor.numpy(force=True)


def _float32(array: np.ndarray) -> np.ndarray:
    return array if array.dtype == np.float32 else array.astype(np.float32)


def _matmul(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    rows = max(1, SINGLE_THREAD_GEMM // max(1, w.shape[0] * w.shape[1]))
    if x.shape[0] <= rows:
        return x @ w
    return np.concatenate([x[start:start + rows] @ w for start in range(0, x.shape[0], rows)])

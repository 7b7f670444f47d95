"""The feature cache's configuration and what it stores: per (context, block), each sample's last update.

Semantics, per block, per cache context (one per classifier-free-guidance branch) and per sample:
- when the block runs for a sample, ``delta = out - in`` is stored for each residual output;
- when the router skips the block for that sample, the block returns ``in + delta`` if a delta exists and has
  been reused fewer than ``max_reuse`` times in a row, else ``in`` (identity);
- band rule (``band`` set): samples whose run-probability lies in ``[tau, tau + band)`` (run, but barely) reuse the
  delta instead of running (when one is usable, else they run); samples below ``tau`` skip to identity.
- ``fallback="run"``: a skip is never identity: a sample that would take identity reuses a usable delta, else runs.
Contexts keep rows apart: CFG as one batch (one context, cond and uncond rows) and CFG as two calls (contexts
"cond" and "uncond") see the same deltas per sample. ``reset()`` (or a sampler's ``start_generation``) forgets
everything; a batch-size change within a context also starts that context afresh.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import per_sample
from ..errors import ConfigError, ElasticCompileError


class CacheContextError(ElasticCompileError):
    """The feature cache is on but the model was called outside any cache context."""


@dataclass(frozen=True)
class FeatureCacheConfig:
    """``max_reuse``: K, how many times in a row a delta may stand in for the block. ``band``: see module doc.
    ``fallback``: what a skip does when no delta is usable (first step, or K reuses in a row): "identity" (the
    block is left out, what plain routers are trained for) or "run" (the block runs and refreshes its delta, so a
    skip always means reuse: what cache-aware routers are trained for)."""

    max_reuse: int = 2
    band: float | None = None
    fallback: str = "identity"

    def __post_init__(self):
        if self.fallback not in ("identity", "run"):
            raise ConfigError("fallback in {'identity', 'run'}", repr(self.fallback),
                              "Use 'run' for routers trained with cache_aware=True, 'identity' otherwise.")
        if self.max_reuse < 1:
            raise ConfigError("max_reuse >= 1", f"{self.max_reuse}", "Use e.g. 2; disable the cache to never reuse.")
        if self.band is not None and not 0.0 < self.band < 1.0:
            raise ConfigError("band in (0, 1) or None", f"{self.band}", "Use e.g. 0.1.")


class _Entry:
    def __init__(self, batch: int):
        self.batch = batch
        self.deltas: dict[int, torch.Tensor] = {}
        self.valid = [False] * batch
        self.reuse = [0] * batch


class DeviceEntry:
    """The same state as :class:`_Entry` as device tensors, for gates that route on the device
    (``nn/gate/device.py``): updated in place, so a captured CUDA graph keeps reading and writing the
    same memory across replays and ``reset`` reaches it."""

    def __init__(self, inputs: dict[int, torch.Tensor], batch: int):
        device = next(iter(inputs.values())).device
        self.batch = batch
        self.valid = torch.zeros(batch, dtype=torch.bool, device=device)
        self.reuse = torch.zeros(batch, dtype=torch.long, device=device)
        self.deltas = {leaf: torch.zeros_like(x) for leaf, x in inputs.items()}

    def reset(self) -> None:
        self.valid.zero_()
        self.reuse.zero_()


class FeatureCacheState:
    """Deltas and reuse counters per (context, block); ``context`` is the active branch name."""

    def __init__(self, config: FeatureCacheConfig):
        self.config = config
        self.context: str | None = None
        self.entries: dict[tuple[str, int], _Entry] = {}
        self.device_entries: dict[tuple[str, int, int], DeviceEntry] = {}

    def reset(self) -> None:
        self.entries.clear()
        for entry in self.device_entries.values():  # in place: captured graphs hold these tensors
            entry.reset()

    def _require_context(self) -> str:
        if self.context is None:
            raise CacheContextError("model calls inside a cache context while the feature cache is on",
                                    "a call outside any context",
                                    "Wrap each call in `with elastic_compile.cache_context(model, 'cond'):` (one name "
                                    "per CFG branch) or sample with ElasticCacheHooks.")
        return self.context

    def device_entry(self, block: int, inputs: dict[int, torch.Tensor], batch: int) -> DeviceEntry:
        """The device-side state of ``block`` for the active context and this batch size (created on first use,
        which must not be inside a CUDA-graph capture: ``capture_cuda_graph`` warms up first)."""
        key = (self._require_context(), block, batch)
        entry = self.device_entries.get(key)
        if entry is None:
            if any(x.is_cuda for x in inputs.values()) and torch.cuda.is_current_stream_capturing():
                raise CacheContextError("the feature cache's device buffers created before a CUDA-graph capture",
                                        f"a capture in context {key[0]!r} that no warm-up ran",
                                        "Capture with elastic_compile.serve.capture_cuda_graph (it warms up each "
                                        "context first), inside the cache context the graph will serve.")
            entry = self.device_entries[key] = DeviceEntry(inputs, batch)
        return entry

    def entry(self, block: int, batch: int) -> _Entry:
        key = (self._require_context(), block)
        entry = self.entries.get(key)
        if entry is None or entry.batch != batch:
            entry = self.entries[key] = _Entry(batch)
        return entry

    def usable(self, block: int, batch: int) -> list[bool]:
        entry = self.entry(block, batch)
        return [v and r < self.config.max_reuse for v, r in zip(entry.valid, entry.reuse)]

    def reused_output(self, block: int, inputs: dict[int, torch.Tensor], reuse: list[bool]) -> dict[int, torch.Tensor]:
        """``in + delta`` for samples in ``reuse``, ``in`` for the others; counts the reuses."""
        entry = self.entry(block, len(reuse))
        if not any(reuse):
            return dict(inputs)
        out = {}
        for leaf, x in inputs.items():
            mask = per_sample(torch.tensor(reuse, device=x.device), x)
            out[leaf] = torch.where(mask, x + entry.deltas[leaf].to(x.dtype), x)
        for s, r in enumerate(reuse):
            if r:
                entry.reuse[s] += 1
        return out

    def store(self, block: int, inputs: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor], ran: list[bool]) -> None:
        """Remember ``out - in`` for the samples that ran."""
        entry = self.entry(block, len(ran))
        if not any(ran):
            return
        rows = torch.tensor([s for s, r in enumerate(ran) if r], device=next(iter(inputs.values())).device)
        for leaf, x in inputs.items():
            delta = (outputs[leaf] - x).detach().index_select(0, rows)
            if leaf not in entry.deltas:
                entry.deltas[leaf] = torch.zeros_like(x.detach())
            entry.deltas[leaf] = entry.deltas[leaf].index_copy(0, rows, delta)
        for s, r in enumerate(ran):
            if r:
                entry.valid[s], entry.reuse[s] = True, 0

"""The feature cache's configuration and what it stores: per (context, block), each sample's last update.

Per block, per cache context (one per classifier-free-guidance branch) and per sample: when the block runs,
``delta = out - in`` is stored for each residual output; when it does not, the cache's rules (:mod:`.rules`) say
whether a stand-in (the stored delta) is added to its input. Contexts keep rows apart: CFG as one batch (one
context, cond and uncond rows) and CFG as two calls (contexts "cond" and "uncond") see the same deltas per sample.
``reset()`` (or a sampler's ``start_generation``) forgets everything; a batch-size change within a context also
starts that context afresh.

Each (context, block) is a :class:`HostEntry` (Python lists, for the host gate) or a :class:`DeviceEntry`
(tensors updated in place, for device routing and captured CUDA graphs). Both answer the same three questions:
which stand-ins are available per sample, what the skip output is for given stand-ins, and what to store after
the block ran.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batch import per_sample
from ..errors import ConfigError, ElasticCompileError
from .rules import DEVICE, HOST, REUSE, plan


class CacheContextError(ElasticCompileError):
    """The feature cache is on but the model was called outside any cache context."""


@dataclass(frozen=True)
class FeatureCacheConfig:
    """``max_reuse``: K, how many times in a row a delta may stand in for the block. ``band``: the band rule of
    :mod:`.rules` (None: off). ``fallback``: what a skip does when no delta is usable (first step, or K reuses in a
    row): "identity" (the block is left out, what plain routers are trained for) or "run" (the block runs and
    refreshes its delta, so a skip always means reuse: what cache-aware routers are trained for)."""

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


class HostEntry:
    """One (context, block) as Python lists per sample: whether a delta is stored, how often it stood in since."""

    flags = HOST

    def __init__(self, batch: int):
        self.batch = batch
        self.deltas: dict[int, torch.Tensor] = {}
        self.valid = [False] * batch
        self.reuse = [0] * batch

    def available(self, max_reuse: int) -> dict[int, list[bool]]:
        return {REUSE: [v and r < max_reuse for v, r in zip(self.valid, self.reuse)]}

    def skip_values(self, inputs: dict[int, torch.Tensor], stand_in: list[int]) -> dict[int, torch.Tensor]:
        """``in + delta`` for samples whose stand-in is a reuse, ``in`` for the others; counts the reuses."""
        reused = [code == REUSE for code in stand_in]
        if not any(reused):
            return dict(inputs)
        out = {}
        for leaf, x in inputs.items():
            mask = per_sample(torch.tensor(reused, device=x.device), x)
            out[leaf] = torch.where(mask, x + self.deltas[leaf].to(x.dtype), x)
        for s, r in enumerate(reused):
            if r:
                self.reuse[s] += 1
        return out

    def store(self, inputs: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor], ran: list[bool]) -> None:
        """Remember ``out - in`` for the samples that ran (their reuse counts restart)."""
        if not any(ran):
            return
        rows = torch.tensor([s for s, r in enumerate(ran) if r], device=next(iter(inputs.values())).device)
        for leaf, x in inputs.items():
            delta = (outputs[leaf] - x).detach().index_select(0, rows)
            if leaf not in self.deltas:
                self.deltas[leaf] = torch.zeros_like(x.detach())
            self.deltas[leaf] = self.deltas[leaf].index_copy(0, rows, delta)
        for s, r in enumerate(ran):
            if r:
                self.valid[s], self.reuse[s] = True, 0


class DeviceEntry:
    """The state of :class:`HostEntry` as device tensors, for gates that route on the device (``nn/gate/device.py``):
    updated in place, so a captured CUDA graph keeps reading and writing the same memory across replays and
    ``reset`` reaches it."""

    flags = DEVICE

    def __init__(self, inputs: dict[int, torch.Tensor], batch: int):
        device = next(iter(inputs.values())).device
        self.batch = batch
        self.valid = torch.zeros(batch, dtype=torch.bool, device=device)
        self.reuse = torch.zeros(batch, dtype=torch.long, device=device)
        self.deltas = {leaf: torch.zeros_like(x) for leaf, x in inputs.items()}

    def reset(self) -> None:
        self.valid.zero_()
        self.reuse.zero_()

    def available(self, max_reuse: int) -> dict[int, torch.Tensor]:
        return {REUSE: self.valid & (self.reuse < max_reuse)}

    def skip_values(self, inputs: dict[int, torch.Tensor], stand_in: torch.Tensor) -> dict[int, torch.Tensor]:
        """New tensors: ``in + delta`` for rows whose stand-in is a reuse, ``in`` for the others."""
        reused = stand_in == REUSE
        return {leaf: torch.where(per_sample(reused, x), x + self.deltas[leaf], x) for leaf, x in inputs.items()}

    def store(self, inputs: dict[int, torch.Tensor], outputs: dict[int, torch.Tensor], ran: torch.Tensor,
              stand_in: torch.Tensor) -> None:
        """In place: ``delta = out - in`` for rows that ran (their counters restart), one more reuse for rows
        whose stand-in was a reuse."""
        for leaf, delta in self.deltas.items():
            x = inputs[leaf]
            delta.copy_(torch.where(per_sample(ran, x), outputs[leaf] - x, delta))
        self.reuse.copy_(torch.where(ran, 0, self.reuse + (stand_in == REUSE).long()))
        self.valid.logical_or_(ran)


class FeatureCacheState:
    """Entries per (context, block); ``context`` is the active branch name."""

    def __init__(self, config: FeatureCacheConfig):
        self.config = config
        self.context: str | None = None
        self.entries: dict[tuple[str, int], HostEntry] = {}
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

    def entry(self, block: int, batch: int) -> HostEntry:
        key = (self._require_context(), block)
        entry = self.entries.get(key)
        if entry is None or entry.batch != batch:
            entry = self.entries[key] = HostEntry(batch)
        return entry

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

    def plan(self, entry: HostEntry | DeviceEntry, run, scores, threshold: float):
        """``(run, stand_in)`` per sample for a block whose decision was ``run`` (:func:`.rules.plan`)."""
        return plan(entry.flags, self.config, threshold, run, scores, entry.available(self.config.max_reuse))


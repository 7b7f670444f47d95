"""The feature cache's configuration and state: per (context, block), each sample's last updates.

Per block, per cache context (one per classifier-free-guidance branch) and per sample: when the block runs,
``delta = out - in`` is stored for each residual output (as many past updates as the model's skip actions read);
when it does not, the cache's rules (:mod:`.rules`) say whether a stand-in (the last update, or a forecast from
the last ones: :mod:`.forecast`) is added to its input. Contexts keep rows apart: CFG as one batch (one
context, cond and uncond rows) and CFG as two calls (contexts "cond" and "uncond") see the same deltas per sample.
``reset()`` (or a sampler's ``start_generation``) forgets everything; a batch-size change within a context also
starts that context afresh, and so does a new generation (:class:`GenerationClock`: the timestep moving back
against the direction of the sampler's steps), so a forgotten ``reset_cache`` never carries one generation's
updates into the next.

Per caller: the active context and the host entries are per thread (:class:`CallerRows`), so generations run
concurrently from several threads on one model never see each other's updates (and one thread's ``reset``
forgets only its own). The device entries (device routing, captured CUDA graphs) are shared: device routing
serves one caller at a time.

Each (context, block) is a :class:`HostEntry` (Python lists, for the host gate) or a :class:`DeviceEntry`
(tensors updated in place, for device routing and captured CUDA graphs). Both answer the same three questions:
where a stand-in can serve each sample, what the skip output is for given stand-ins, and what to store after
the block ran.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import SKIP_ACTIONS
from ..errors import ConfigError, ElasticCompileError
from ..state import PerThread
from .device_entry import DeviceEntry
from .generation import GenerationClock, timestep_value
from .host_entry import HostEntry
from .rules import CODES, plan


class CacheContextError(ElasticCompileError):
    """The feature cache is on but the model was called outside any cache context."""


@dataclass(frozen=True)
class FeatureCacheConfig:
    """``max_reuse``: K, how many times in a row a stand-in may take the block's place. ``band``: the band rule of
    :mod:`.rules` (None: off). ``fallback``: what a skip does when no delta is usable (first step, or K reuses in a
    row): "identity" (the block is left out, what plain routers are trained for) or "run" (the block runs and
    refreshes its delta, so a skip always means reuse: what cache-aware routers are trained for).
    ``forecast_min_points``: the fewest stored updates a forecast action extrapolates from (an action that reads
    more uses the points there are, down to this): 2, a forecast never stands in as a plain reuse of a single
    update (early in a generation, where updates change fastest, that costs several dB); 1, any stored update
    (artifacts written before this option were trained so)."""

    max_reuse: int = 2
    band: float | None = None
    fallback: str = "identity"
    forecast_min_points: int = 2

    def __post_init__(self):
        if self.fallback not in ("identity", "run"):
            raise ConfigError("fallback in {'identity', 'run'}", repr(self.fallback),
                              "Use 'run' for routers trained with cache_aware=True, 'identity' otherwise.")
        if self.max_reuse < 1:
            raise ConfigError("max_reuse >= 1", f"{self.max_reuse}", "Use e.g. 2; disable the cache to never reuse.")
        if self.band is not None and not 0.0 < self.band < 1.0:
            raise ConfigError("band in (0, 1) or None", f"{self.band}", "Use e.g. 0.1.")
        if self.forecast_min_points not in (1, 2):
            raise ConfigError("forecast_min_points 1 or 2", f"{self.forecast_min_points}",
                              "Use 2 (forecasts need a slope), or 1 (any stored update) for routers trained so.")


class CallerRows(PerThread):
    """One caller's (thread's) side of the cache: its active context, its host entries per (context, block) and
    the timestep clock of each context."""

    def __init__(self):
        self.context: str | None = None
        self.entries: dict[tuple[str, int], HostEntry] = {}
        self.clocks: dict[str, GenerationClock] = {}


class FeatureCacheState:
    """Entries per (context, block); ``context`` is the active branch name (both the calling thread's).
    ``skip_actions``: the model's (``ElasticConfig.skip_actions``): how many past updates to keep, and the stand-in
    of a skip no router chose an action for (the first). ``timestep``: ``(argument name, position)`` of the model
    forward's timestep (None: an argument named like one, passed by keyword), read to detect new generations."""

    def __init__(self, config: FeatureCacheConfig, skip_actions: tuple[str, ...] = ("reuse",),
                 timestep: tuple[str, int | None] | None = None):
        self.config = config
        self.skip_actions = tuple(skip_actions)
        self.depth = max(SKIP_ACTIONS[a] for a in self.skip_actions)
        self.codes = [CODES[a] for a in self.skip_actions]
        self.timestep = timestep
        self.rows = CallerRows()
        self.device_entries: dict[tuple[str, int, int], DeviceEntry] = {}
        self.auto_resets = 0  # new generations detected (all callers)

    @property
    def context(self) -> str | None:
        return self.rows.context

    @context.setter
    def context(self, name: str | None) -> None:
        self.rows.context = name

    @property
    def entries(self) -> dict[tuple[str, int], HostEntry]:
        return self.rows.entries

    def reset(self) -> None:
        """Forget the calling thread's updates (and reset the shared device entries)."""
        rows = self.rows
        rows.entries.clear()
        rows.clocks.clear()
        for entry in self.device_entries.values():  # in place: captured graphs hold these tensors
            entry.reset()

    def reset_context(self, context: str) -> None:
        """Forget the calling thread's updates in ``context`` (and reset the device entries of ``context``)."""
        entries = self.rows.entries
        for key in [key for key in entries if key[0] == context]:
            del entries[key]
        for key, entry in self.device_entries.items():
            if key[0] == context:
                entry.reset()

    def begin_call(self, args: tuple, kwargs: dict) -> None:
        """At the start of every model call (the model's root hook): a call whose timestep starts a new generation
        in the active context (:class:`GenerationClock`) resets that context first."""
        rows = self.rows
        context = rows.context
        if context is None:
            return
        value = timestep_value(args, kwargs, self.timestep)
        if value is None:
            return
        clock = rows.clocks.get(context)
        if clock is None:
            clock = rows.clocks[context] = GenerationClock()
        if clock.advance(value):
            self.reset_context(context)
            self.auto_resets += 1

    def _require_context(self, rows: CallerRows | None = None) -> str:
        context = (rows or self.rows).context
        if context is None:
            raise CacheContextError("model calls inside a cache context while the feature cache is on",
                                    "a call outside any context",
                                    "Wrap each call in `with elastic_compile.cache_context(model, 'cond'):` (one name "
                                    "per CFG branch) or sample with ElasticCacheHooks.")
        return context

    def entry(self, block: int, batch: int) -> HostEntry:
        rows = self.rows
        key = (self._require_context(rows), block)
        entries = rows.entries
        entry = entries.get(key)
        if entry is None or entry.batch != batch:
            entry = entries[key] = HostEntry(batch, self.depth)
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
            entry = self.device_entries[key] = DeviceEntry(inputs, batch, self.depth)
        return entry

    def plan(self, entry: HostEntry | DeviceEntry, run, scores, threshold: float, actions=None):
        """``(run, stand_in)`` per sample for a block whose decision was ``run`` (:func:`.rules.plan`).
        ``actions``: per sample, the index into ``skip_actions`` its router chose (None: the first action)."""
        flags = entry.flags
        if actions is None:
            choice = flags.filled(run, self.codes[0])
        elif isinstance(actions, list):
            choice = [self.codes[a] for a in actions]
        else:
            choice = self.code_table(actions.device).index_select(0, actions)
        usable = entry.usable(self.config.max_reuse, choice, self.config.forecast_min_points)
        return plan(flags, self.config, threshold, run, scores, usable, choice)

    def code_table(self, device) -> torch.Tensor:
        """The stand-in code of each skip action as a device tensor (indexed by the router's action)."""
        table = self.__dict__.get("_code_table")
        if table is None or table.device != torch.device(device):
            table = self._code_table = torch.tensor(self.codes, device=device)
        return table

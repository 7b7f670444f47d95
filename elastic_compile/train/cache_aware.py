"""Cache-aware distillation: train a skip to mean "reuse the block's update from an earlier step".

At inference with the feature cache (elastic_compile/cache), a skipped block returns ``x + delta`` where ``delta`` is
the block's update from the last step it ran. Routers trained with plain skips (``x``) learn to skip only where
a block can be *removed*; a cache makes skipping far cheaper in quality wherever the update changes slowly
across steps, which plain training never sees. Here the student's skip branch adds the dense model's update of
the same sample 1..K sampling steps earlier (what a cache allowed K reuses in a row can hold), so the routers
learn where reuse is safe. Samples at the first step of a generation have no earlier step: a skip there is plain
identity in training (served with ``fallback="run"``, such a skip runs the block).
"""
from __future__ import annotations

import torch
from torch import nn

from ..batch import per_sample
from ..cache import FeatureCacheConfig, FeatureCacheState
from ..errors import ConfigError
from ..state import force, state_of
from .trajectories import TrajectoryDataset

_CONTEXT = "previous-step"


def require_step_links(data) -> TrajectoryDataset:
    """The dataset, checked to know each row's previous step."""
    if not isinstance(data, TrajectoryDataset) or data.previous is None:
        found = "an iterable of batches" if not isinstance(data, TrajectoryDataset) else "a dataset without step links"
        raise ConfigError("a TrajectoryDataset whose rows are linked to their previous sampling step", found,
                          "Record it with record_class_conditional_trajectories, or with record_trajectories and "
                          "a sampler that is given the recorder as hooks (sample(d, ..., hooks=d)).")
    return data


def steps_back(data: TrajectoryDataset, rows: torch.Tensor, staleness: torch.Tensor) -> torch.Tensor:
    """For each row, the row ``staleness`` steps earlier on its trajectory (as far back as the trajectory goes,
    at least one step), or -1 for a row at a first step."""
    current = rows.cpu().clone()
    result = torch.full_like(current, -1)
    for step in range(int(staleness.max()) if len(staleness) else 0):
        before = data.previous.index_select(0, current.clamp(min=0))
        moved = (before >= 0) & (current >= 0)
        result = torch.where(moved, before, result)
        current = torch.where(moved & (step + 1 < staleness.cpu()), before, torch.full_like(current, -1))
    return result


@torch.no_grad()
def previous_step_updates(model: nn.Module, data: TrajectoryDataset, rows: torch.Tensor,
                          extra_keys: tuple[str, ...] = (), max_staleness: int = 1,
                          generator: torch.Generator | None = None) -> dict[int, dict[int, torch.Tensor]]:
    """Per skippable block and residual output: the dense update ``out - in`` of each of ``rows`` at an earlier
    step (zero for rows at a first step), computed by one dense forward that fills a scratch cache.

    The step is ``s`` steps back with ``s`` uniform in ``1..max_staleness`` per row: a cache allowed ``K`` reuses
    in a row serves updates up to ``K`` steps old, and training on all of those ages keeps routers honest.
    """
    staleness = torch.randint(1, max_staleness + 1, (len(rows),), generator=generator)
    previous = steps_back(data, rows, staleness)
    available = previous >= 0
    inputs = data.batch(previous.clamp(min=0))
    for key in extra_keys:
        inputs.pop(key, None)
    state = state_of(model)
    saved = state.cache
    scratch = FeatureCacheState(FeatureCacheConfig())
    scratch.context = _CONTEXT
    state.cache = scratch
    try:
        with force(model, skip=False, width=1.0):
            model(**inputs)
    finally:
        state.cache = saved
    updates: dict[int, dict[int, torch.Tensor]] = {}
    for (_, block), entry in scratch.entries.items():
        for leaf, delta in entry.deltas.items():
            mask = per_sample(available.to(delta.device), delta)
            updates.setdefault(block, {})[leaf] = delta * mask.to(delta.dtype)
    return updates

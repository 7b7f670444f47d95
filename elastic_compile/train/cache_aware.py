"""Cache-aware distillation: train a skip to mean "stand in with the block's updates from earlier steps".

At inference with the feature cache (elastic_compile/cache), a skipped block returns ``x + delta`` where ``delta`` is
the block's update from the last step it ran. Routers trained with plain skips (``x``) learn to skip only where
a block can be *removed*; a cache makes skipping far cheaper in quality wherever the update changes slowly
across steps, which plain training never sees. Here the student's skip branch adds the dense model's update of
the same sample 1..K sampling steps earlier (what a cache allowed K reuses in a row can hold), so the routers
learn where reuse is safe. Samples at the first step of a generation have no earlier step: a skip there is plain
identity in training (served with ``fallback="run"``, such a skip runs the block).

With forecasting skip actions (``ElasticConfig.skip_actions``), :func:`dense_stand_ins` gives every action its
stand-in from several earlier dense updates, spaced as a cache would hold them, and the router learns which
action to take where. All of this scores each step on its own; ``objective="rollout"`` (train/rollout.py) then
trains on whole generations with the cache in the loop.
"""
from __future__ import annotations

import torch
from torch import nn

from ..batch import per_sample
from ..cache import FeatureCacheConfig, FeatureCacheState
from ..cache.forecast import lagrange_weight_rows
from ..config import SKIP_ACTIONS
from ..errors import ConfigError
from ..state import force, state_of
from .store import TrajectoryStore
from .trajectories import TrajectoryDataset

_CONTEXT = "previous-step"


def require_step_links(data) -> TrajectoryDataset:
    """The dataset (in memory, or a store on disk), checked to know each row's previous step."""
    dataset = isinstance(data, (TrajectoryDataset, TrajectoryStore))
    if not dataset or data.previous is None:
        found = "an iterable of batches" if not dataset else "a dataset without step links"
        raise ConfigError("a TrajectoryDataset whose rows are linked to their previous sampling step", found,
                          "Record it with record_class_conditional_trajectories, or with record_trajectories and "
                          "a sampler that is given the recorder as hooks (sample(d, ..., hooks=d)).")
    return data


def exactly_steps_back(data: TrajectoryDataset, rows: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """For each row, the row exactly ``back`` (>= 1) steps earlier on its trajectory, or -1 where the trajectory
    does not reach that far."""
    current = rows.cpu().clone()
    for step in range(int(back.max()) if len(back) else 0):
        walking = step < back.cpu()
        before = data.previous.index_select(0, current.clamp(min=0))
        current = torch.where(walking, torch.where(current >= 0, before, current), current)
    return current


@torch.no_grad()
def dense_updates(model: nn.Module, data: TrajectoryDataset, rows: torch.Tensor,
                  extra_keys: tuple[str, ...] = ()) -> dict[int, dict[int, torch.Tensor]]:
    """Per skippable block and residual output, the dense update ``out - in`` of each row (one dense forward
    filling a scratch cache); rows may be -1 (their values are meaningless and must be masked)."""
    inputs = data.batch(rows.clamp(min=0))
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
    return {block: {leaf: slots[-1] for leaf, slots in entry.slots.items()}
            for (_, block), entry in scratch.entries.items()}


@torch.no_grad()
def dense_stand_ins(model: nn.Module, data: TrajectoryDataset, rows: torch.Tensor, extra_keys: tuple[str, ...] = (),
                    max_reuse: int = 2, generator: torch.Generator | None = None, ages: torch.Tensor | None = None,
                    spacings: torch.Tensor | None = None) -> dict[int, dict[int, torch.Tensor]]:
    """Per skippable block and residual output, an ``(A, B, ...)`` tensor: for each skip action of the model
    (``ElasticConfig.skip_actions``, in order), the stand-in the feature cache would serve each of ``rows``.

    What the cache holds depends on when the block last ran; per row this draws how long ago (``1..max_reuse``
    steps: a cache allowing K stand-ins in a row serves updates up to K steps old) and how far apart its earlier
    runs were (``1..max_reuse + 1`` steps), takes the dense updates at those steps, and extrapolates each action's
    polynomial (``cache/forecast.py``) to the row's own step. Points before the start of a trajectory are missing
    (an action then uses fewer points; a row at a first step gets zeros: identity). ``ages`` / ``spacings``
    (per row) replace the random draws."""
    actions = state_of(model).config.skip_actions
    depth = max(SKIP_ACTIONS[a] for a in actions)
    age = torch.randint(1, max_reuse + 1, (len(rows),), generator=generator) if ages is None else ages
    spacing = (torch.randint(1, max_reuse + 2, (len(rows),), generator=generator) if spacings is None
               else spacings)
    backs = [age + j * spacing for j in range(depth)]                 # nearest point first
    points = [exactly_steps_back(data, rows, back) for back in backs]
    available = torch.stack([p >= 0 for p in points], dim=1)          # (B, depth), nearest first
    count = available.long().sum(dim=1)
    stamps = torch.stack([-b.double() for b in reversed(backs)], dim=1)   # oldest first, the row's step is 0
    updates = [dense_updates(model, data, p, extra_keys) for p in reversed(points)]
    result: dict[int, dict[int, torch.Tensor]] = {}
    for block, leaves in updates[-1].items():
        for leaf, newest in leaves.items():
            per_action = []
            for action in actions:
                weights = lagrange_weight_rows(stamps, torch.minimum(count, torch.tensor(SKIP_ACTIONS[action])), 0.0)
                value = torch.zeros_like(newest)
                for k in range(depth):
                    value = value + per_sample(weights[:, k].to(newest.device, newest.dtype), newest) * \
                        updates[k][block][leaf]
                per_action.append(value)
            result.setdefault(block, {})[leaf] = torch.stack(per_action)
    return result

"""Routers that serve a per-step, per-block schedule: which blocks run at which denoising step.

Where per-sample routing does not pay (the routers' decisions averaged over samples serve as well as the routers),
what a router set can still learn is *where in the trajectory* each block may stand in with the feature cache.
Such a schedule (a table ``run[step][block]``, found e.g. by searching the served objective directly:
``benchmarks/search_schedule.py``) is served here as ordinary routers, so everything that serves routers serves it
unchanged (``ec.save``/``ec.load``, the feature cache, ONNX export, the runtime): :func:`fit_schedule_routers`
trains each router's run logit on the router features that are the same for every sample of a call (the
timestep), with the features that differ per sample switched off, until every (step, block) decision of the
table is reproduced with margin; the action head picks one skip action everywhere, or per (step, block) from a
second table (learned from the timestep like the run logit).

Guarantee: after fitting, the routers' decision (and skip action where a block stands in) for every recorded
step equals the tables (checked; a :class:`~elastic_compile.errors.ConfigError` says when the features cannot tell
two steps apart). At other step
counts than the recorded one the routers interpolate between the timesteps they were fitted on (unchecked).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

from ..errors import ConfigError
from ..state import state_of
from ..nn.gate.decisions import best_action
from .rollout import chosen_skip_action

#: Logit margin each fitted decision keeps from the run threshold.
MARGIN = 3.0
#: Logit the recording generation serves (every block runs, dense width, the first skip action).
SURE = 20.0


def record_step_features(model, generate: Callable[[], object]) -> dict[int, list[dict]]:
    """Per router, the arguments of each call in one generation (``generate()``, run dense). Calls with equal features (the CFG branches of one
    step) are one step; steps are numbered in the order they first occur."""
    state = state_of(model)
    calls: dict[int, list[dict]] = {index: [] for index in state.routers}

    def recorder(index, router):
        def logits(arguments):
            calls[index].append({f.name: arguments[f.name].detach() for f in router.features})
            batch = max(v.shape[0] for v in calls[index][-1].values() if v.ndim > 0)
            row = torch.full((1 + router.num_widths + router.num_actions,), -SURE)
            row[0] = row[router.num_widths] = SURE
            if router.num_actions:
                row[1 + router.num_widths] = SURE
            return row.expand(batch, -1)
        return logits

    try:
        for index, router in state.routers.items():
            router.logits = recorder(index, router)  # instance attribute: shadows the method until removed
        with torch.no_grad():
            generate()
    finally:
        for router in state.routers.values():
            router.__dict__.pop("logits", None)
    return calls


def shared_features(router, calls: list[dict]) -> list[str]:
    """Names of the router's features whose rows are identical within every call (per call, not per sample)."""
    names = []
    for feature in router.features:
        values = [call[feature.name] for call in calls]
        if all(v.ndim == 0 or v.shape[0] == 1 or torch.equal(v, v[:1].expand_as(v)) for v in values):
            names.append(feature.name)
    return names


def steps_of(calls: list[dict], names: list[str]) -> list[int]:
    """Step index of each call: calls with equal shared features are one step, numbered by first occurrence."""
    keys, steps = [], []
    for call in calls:
        key = torch.cat([call[n].reshape(call[n].shape[0] if call[n].ndim else 1, -1)[:1].float().flatten()
                         for n in names])
        for step, known in enumerate(keys):
            if torch.equal(known, key):
                break
        else:
            keys.append(key)
            step = len(keys) - 1
        steps.append(step)
    return steps


def fit_schedule_routers(model, table: Sequence[Sequence[bool]], generate: Callable[[], object],
                         action: str | Sequence[Sequence[str | None]] | None = None, iterations: int = 2000,
                         lr: float = 0.02) -> None:
    """Train every router of ``model`` to decide ``table[step][block]`` (run or not) at each step of the
    generations ``generate()`` runs (one is recorded, dense; it must generate several samples from different
    noise, or a per-sample feature such as the first block's input looks shared), from the features shared by a
    call's samples only, and to take skip ``action`` when not running: one action name for every cell (default:
    the model's last, highest-order one), or a table ``action[step][block]`` of names (None where the block
    runs, or for the default), which the action head then learns from the timestep too.

    ``block`` indexes the model's blocks in the order they run (as ``ec.force`` does); blocks without a router
    must be ``True`` in every row. Records in the model's serving settings (saved with ``ec.save``, restored by
    ``ec.load``) the feature cache the table needs: fallback "run", ``max_reuse`` the longest run of stand-ins
    in a row, forecasts from two stored updates. The decisions are checked after fitting."""
    state = state_of(model)
    steps = len(table)
    actions = state.config.skip_actions
    if any(len(row) != len(state.blocks) for row in table):
        raise ConfigError(f"a table of rows with {len(state.blocks)} entries (one per block)",
                          f"rows of {sorted({len(row) for row in table})}", "Give one decision per block and step.")
    chosen = action_table(state, action, table)
    unrouted = [b for b in range(len(state.blocks)) if b not in state.routers and not all(r[b] for r in table)]
    if unrouted:
        raise ConfigError("skips only at blocks with a router", f"skips at blocks {unrouted}",
                          "Run those blocks at every step (see ec.report for why they have no router).")
    recorded = record_step_features(model, generate)
    rows = min((max(v.shape[0] if v.ndim else 1 for v in call.values()) for calls in recorded.values()
                for call in calls), default=0)
    if rows < 2:
        raise ConfigError("a recording generation of several samples per call", f"calls of {rows} row(s)",
                          "Generate at least two samples from different noise in `generate`.")
    threshold_logit = math.log(state.config.threshold / (1.0 - state.config.threshold))
    for index, router in state.routers.items():
        calls = recorded[index]
        names = shared_features(router, calls)
        if not names:
            raise ConfigError("a router feature equal for every sample of a call (the timestep)",
                              f"features {[f.name for f in router.features]} that all differ per sample",
                              "Schedule routers need the timestep among the router's features.")
        call_steps = steps_of(calls, names)
        if max(call_steps) + 1 != steps:
            raise ConfigError(f"a generation of {steps} steps (the table's rows)",
                              f"{max(call_steps) + 1} distinct steps in the recorded generation",
                              "Record with the step count the table was made for.")
        inputs = [{n: (call[n] if call[n].ndim == 0 else call[n][:1]) for n in names} for call in calls]
        target = torch.tensor([1.0 if table[s][index] else -1.0 for s in call_steps])
        fit_run_logit(router, names, inputs, target, threshold_logit, iterations, lr)
        wanted = [actions.index(chosen[s][index]) for s in call_steps]
        standing = [not table[s][index] for s in call_steps]
        set_action(router, wanted[standing.index(True)] if any(standing) else actions.index(chosen[0][index]))
        if len({a for a, stands in zip(wanted, standing) if stands}) > 1:
            fit_action_head(router, names, inputs, wanted, standing, iterations, lr)
        logits = torch.stack([router.plain_logits(_full(router, x, names)).detach()[0] for x in inputs])
        first_action = 1 + router.num_widths
        wrong = [s for s, row, t, a, stands in zip(call_steps, logits.tolist(), target.tolist(), wanted, standing)
                 if (row[0] - threshold_logit) * t <= 0
                 or (stands and router.num_actions and best_action(row[first_action:]) != a)]
        if wrong:
            raise ConfigError("features that tell every step of the table apart",
                              f"block {index}: steps {sorted(set(wrong))} decided against the table",
                              "Give the routers more hidden units or a table whose decisions follow the timestep.")
    state.serving["feature_cache"] = {"max_reuse": longest_stand_in(table), "fallback": "run",
                                     "forecast_min_points": 2}


def action_table(state, action, table: Sequence[Sequence[bool]]) -> list[list[str]]:
    """Per (step, block) the skip action's name: ``action`` everywhere (a name, or None: the model's last), or
    ``action`` as a table of names (None: the model's last), refused where a name is not one of the model's."""
    if action is None or isinstance(action, str):
        name = chosen_skip_action(state, action)
        return [[name] * len(row) for row in table]
    if len(action) != len(table) or any(len(a) != len(row) for a, row in zip(action, table)):
        raise ConfigError(f"an action table shaped like the run table ({len(table)} x {len(table[0])})",
                          f"{len(action)} rows of {sorted({len(a) for a in action})}",
                          "Give one skip action (or None) per step and block.")
    return [[chosen_skip_action(state, name) for name in row] for row in action]


def longest_stand_in(table: Sequence[Sequence[bool]]) -> int:
    """The most steps in a row any block of ``table`` does not run (at least 1)."""
    longest = 1
    for block in range(len(table[0])):
        streak = 0
        for row in table:
            streak = 0 if row[block] else streak + 1
            longest = max(longest, streak)
    return longest


def _full(router, inputs: dict, names: list[str]) -> dict:
    """Router arguments with the per-sample features zeroed (their fc1 columns are zero: any value serves)."""
    out = dict(inputs)
    for feature in router.features:
        if feature.name not in names:
            out[feature.name] = torch.zeros((1,) + ((feature.dim,) if feature.kind != "scalar" else ()))
    return out


def fit_run_logit(router, names, inputs, target, threshold_logit, iterations, lr) -> None:
    """Adam on a margin loss of the run logit; fc1 columns of per-sample features are held at zero."""
    keep = torch.zeros_like(router.fc1.weight)
    start = 0
    for feature in router.features:
        if feature.name in names:
            keep[:, start:start + feature.dim] = 1.0
        start += feature.dim
    with torch.no_grad():
        router.fc1.weight.mul_(keep)
        router.fc2.weight[1:].zero_()
    parameters = [router.fc1.weight, router.fc1.bias, router.fc2.weight, router.fc2.bias]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    batch = [_full(router, x, names) for x in inputs]
    for _ in range(iterations):
        logits = torch.cat([router.plain_logits(x)[:1, 0] for x in batch])
        margin = (logits - threshold_logit) * target
        if bool((margin > MARGIN).all()):
            break
        loss = F.softplus(MARGIN - margin).mean()
        optimizer.zero_grad()
        loss.backward()
        router.fc1.weight.grad.mul_(keep)
        router.fc2.weight.grad[1:].zero_()
        optimizer.step()
    router.zero_grad(set_to_none=True)


def fit_action_head(router, names, inputs, wanted: list[int], standing: list[bool], iterations: int,
                    lr: float) -> None:
    """Adam on a margin loss of the skip-action logits at the calls where the block stands in: action
    ``wanted[i]`` above every other by ``MARGIN``. Only the action rows of ``fc2`` learn (the hidden layer the
    run logit was fitted on is kept, so the run decisions stay as fitted)."""
    first = 1 + router.num_widths
    rows = slice(first, first + router.num_actions)
    with torch.no_grad():
        hidden = torch.cat([F.silu(router.fc1(router.featurize(_full(router, x, names))))[:1]
                            for x, stands in zip(inputs, standing) if stands])
    target = torch.tensor([a for a, stands in zip(wanted, standing) if stands])
    weight = router.fc2.weight[rows].detach().clone().requires_grad_(True)
    bias = router.fc2.bias[rows].detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    for _ in range(iterations):
        logits = hidden @ weight.t() + bias
        chosen = logits.gather(1, target[:, None])
        others = logits.masked_fill(F.one_hot(target, router.num_actions).bool(), -math.inf)
        margin = chosen[:, 0] - others.max(dim=1).values
        if bool((margin > MARGIN).all()):
            break
        loss = F.softplus(MARGIN - margin).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        router.fc2.weight[rows] = weight
        router.fc2.bias[rows] = bias


def set_action(router, action_index: int) -> None:
    """Width head at the dense bucket, action head always ``action_index`` (zero weights, one-hot bias)."""
    with torch.no_grad():
        router.fc2.weight[1:].zero_()
        router.fc2.bias[1:].zero_()
        router.fc2.bias[router.num_widths] = 4.0 if router.num_widths > 1 else 0.0
        if router.num_actions:
            router.fc2.bias[1 + router.num_widths + action_index] = 4.0

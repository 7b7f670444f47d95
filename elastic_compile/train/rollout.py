"""Rollout distillation: train routers on what the sampler will actually do with them.

Per-step distillation (``objective="step"``) scores every denoiser call on its own, from inputs on the dense
trajectory. It cannot see that an approximated block moves the next step's input, nor that the feature cache's
stand-ins come from the student's own earlier steps, so errors that accumulate along a trajectory stay invisible.
Here (``objective="rollout"``) the student generates whole samples with the feature cache in the loop, exactly as
it will be served, and the loss is the log of the squared distance between its final samples and the dense
model's from the same noise and conditioning (minimising it maximises PSNR against dense)::

    L = log(mean_i ||x0_student_i - x0_dense_i||^2 + eps) + lambda * F + budget_weight * (F - budget)^2

where ``F`` is the executed FLOP fraction of the whole generation (straight-through, ``train/budget.py``) and
``lambda`` a Lagrange multiplier raised by dual ascent while ``F`` exceeds the budget. Decisions are hard in the
forward pass and straight-through in the backward one; gradients flow through the cache's stored updates too
(a stand-in is a function of the student's own earlier outputs).

Data-free: the targets are the dense model's own samples, generated once for a pool of (conditioning, seed)
pairs. A :class:`Rollout` says how to generate; :class:`ClassConditionalRollout` is the class-conditional DiT
sampler of this project (``elastic_compile.sampling.sample``). Any other sampler works through the same
protocol: ``rollout.pool`` (a list of items), ``rollout(denoiser, items, hooks) -> final samples`` with the
sampler driving ``hooks`` (reset per generation, one cache context per guidance branch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import distributed as dist
from torch import nn

from ..cache import ElasticCacheHooks, FeatureCacheConfig, FeatureCacheState
from ..errors import ConfigError
from ..nn.gate.profile import flop_table
from ..sampling import SamplingConfig, sample
from ..state import describe_inputs, force, state_of
from .budget import executed_flops_fraction
from .common import (JsonLog, TrainLogEntry, TrainReport, checkpoint, global_sum, init_distributed,
                     progress_bar, restore_flags, resume_run, trainable)
from .resume import RunState
from .sharding import ShardedBase


class Rollout(Protocol):
    """How to generate final samples for a list of items (anything: labels and seeds, prompts...)."""

    pool: Sequence[Any]

    def __call__(self, denoiser: Callable, items: Sequence[Any], hooks) -> torch.Tensor: ...


@dataclass
class ClassConditionalRollout:
    """Whole generations of a class-conditional DiT with :func:`elastic_compile.sampling.sample`.

    The pool holds ``(class label, noise seed)`` pairs: ``per_class`` seeds for each class, starting at
    ``first_seed`` (keep them apart from the seeds you evaluate on). ``steps`` / ``guidance_scale`` override the
    sampling config (the routers read the timestep: train on the schedule you will serve)."""

    scheduler: Any
    config: SamplingConfig
    per_class: int = 16
    first_seed: int = 10_000
    cfg: str = "batch"
    pool: list = field(init=False)

    def __post_init__(self):
        classes = range(self.config.num_classes)
        self.pool = [(c, self.first_seed + c * self.per_class + i) for c in classes for i in range(self.per_class)]

    def __call__(self, denoiser: Callable, items: Sequence[tuple[int, int]], hooks) -> torch.Tensor:
        labels = [int(label) for label, _ in items]
        seeds = [int(seed) for _, seed in items]
        return sample(denoiser, self.scheduler, labels, self.config, seeds=seeds, cfg=self.cfg, hooks=hooks,
                      differentiable=torch.is_grad_enabled())


@torch.no_grad()
def dense_targets(model: nn.Module, rollout: Rollout, chunk: int = 64) -> torch.Tensor:
    """The dense model's final samples for every item of ``rollout.pool`` (the model forced dense, no cache)."""
    state = state_of(model)
    saved_cache, state.cache = state.cache, None
    try:
        outputs = []
        with force(model, skip=False, width=1.0):
            for start in range(0, len(rollout.pool), chunk):
                outputs.append(rollout(model, rollout.pool[start:start + chunk], None).float().cpu())
    finally:
        state.cache = saved_cache
    return torch.cat(outputs)


class GenerationBudget:
    """Wraps the student during one rollout and adds up the executed FLOP fraction of every denoiser call
    (straight-through, from the gates' soft records), so the budget term covers the whole generation."""

    def __init__(self, model: nn.Module, fraction_of_call: Callable[[nn.Module, tuple, dict], torch.Tensor]):
        self.model = model
        self.fraction_of_call = fraction_of_call
        self.fractions: list[torch.Tensor] = []

    def __call__(self, *args, **kwargs):
        out = self.model(*args, **kwargs)
        self.fractions.append(self.fraction_of_call(self.model, args, kwargs).mean())
        return out

    def parameters(self):  # the sampler reads the device and dtype from here
        return self.model.parameters()

    @property
    def fraction(self) -> torch.Tensor:
        return torch.stack(self.fractions).mean()


def serving_cache(model: nn.Module, max_reuse: int) -> FeatureCacheConfig:
    """The cache rollouts run with and the routers will be served with (recorded in ``state.serving``)."""
    state = state_of(model)
    config = FeatureCacheConfig(max_reuse=max_reuse, fallback="run")
    state.serving["feature_cache"] = {"max_reuse": max_reuse, "fallback": "run",
                                     "forecast_min_points": FeatureCacheConfig.forecast_min_points}
    return config


def rollout_step(model: nn.Module, rollout: Rollout, items: Sequence[Any], targets: torch.Tensor,
                 cache_config: FeatureCacheConfig, fraction_of_call, eps: float = 1e-10):
    """One student rollout with the cache in the loop: ``(log mse, mse, executed fraction)`` with gradients."""
    state = state_of(model)
    saved_cache = state.cache
    state.cache = FeatureCacheState(cache_config, state.config.skip_actions)
    student = GenerationBudget(model, fraction_of_call)
    state.soft = True
    try:
        final = rollout(student, items, ElasticCacheHooks(model)).float()
    finally:
        state.soft = False
        state.cache = saved_cache
    mse = (final - targets.to(final.device)).pow(2).mean()
    return torch.log(mse + eps), mse, student.fraction


@dataclass
class DualBudget:
    """Lagrange multiplier of the budget constraint, raised while the executed fraction exceeds the budget and
    lowered (not below 0) while it is under: the routers are pushed to the budget, not past it."""

    budget: float
    step_size: float = 1.0
    value: float = 0.0

    def update(self, fraction: float) -> None:
        self.value = max(0.0, self.value + self.step_size * (fraction - self.budget))


def check_rollout(rollout) -> None:
    if not callable(rollout) or not hasattr(rollout, "pool") or not len(rollout.pool):
        raise ConfigError("a rollout: a callable with a non-empty .pool (e.g. ClassConditionalRollout)",
                          f"{type(rollout).__name__}",
                          "Pass ClassConditionalRollout(scheduler, sampling_config) as data, or your own sampler.")


def psnr_of_mse(mse: float, data_range: float = 2.0) -> float:
    """PSNR in dB of a mean squared error on images in [-1, 1]."""
    return math.inf if mse <= 0 else 10.0 * math.log10(data_range ** 2 / mse)


class _FractionMeter:
    """Wraps an elastic model; after each call adds the executed FLOP fraction ``stats`` reports (hard decisions)."""

    def __init__(self, model: nn.Module):
        self.model, self.fractions = model, []

    def __call__(self, *args, **kwargs):
        from ..stats import stats
        out = self.model(*args, **kwargs)
        self.fractions.append(stats(self.model).executed_flops_fraction)
        return out

    def parameters(self):
        return self.model.parameters()


@torch.no_grad()
def generation_fraction(model: nn.Module, rollout: Rollout, items: Sequence[Any], cache_config) -> float:
    """Executed FLOP fraction of generating ``items`` as served (hard decisions, the cache on, no gradients)."""
    state = state_of(model)
    saved = state.cache
    state.cache = FeatureCacheState(cache_config, state.config.skip_actions)
    meter = _FractionMeter(model)
    try:
        rollout(meter, items, ElasticCacheHooks(model))
    finally:
        state.cache = saved
    return sum(meter.fractions) / len(meter.fractions)


def reachable_budget(model: nn.Module, rollout: Rollout, budget: float, cache_config) -> float:
    """``budget``, or the lowest fraction the cache allows when the budget is below it (with a warning).

    With fallback "run" a block stands in for at most ``max_reuse`` calls in a row, so even a model that asks to
    skip every block everywhere executes a floor fraction (about 1 / (max_reuse + 1) of the blocks, plus what is
    not a block). A budget under that floor cannot be met: the budget multiplier would keep growing and trade
    fidelity for nothing, so training aims at the floor instead."""
    items = spread_items(rollout, 10)
    with force(model, skip=True):
        floor = generation_fraction(model, rollout, items, cache_config)
    if budget >= floor - 1e-3:
        return budget
    warnings.warn(f"budget {budget:g} is below the lowest executed fraction this cache allows ({floor:.3f} with "
                  f"max_reuse {cache_config.max_reuse}): training for {floor:.3f}. Raise cache_max_reuse (the "
                  "serving cache's K) to go lower.", stacklevel=3)
    return floor


def calibrate_threshold(model: nn.Module, rollout: Rollout, budget: float, cache_config,
                        items: Sequence[Any] | None = None, iterations: int = 12) -> float:
    """Set the routers' run threshold tau so that whole generations execute ``budget`` of the dense FLOPs (or as
    close as the decisions allow), by bisection on the run logit; returns tau (also set in the model's config).

    Training pushes the routers to the budget on average over its batches; the threshold puts the served model on
    it exactly, on generations of ``items`` (default: a class-balanced slice of the rollout's pool), since a
    higher tau removes the samples and blocks the routers were least sure to run first."""
    state = state_of(model)
    items = list(items) if items is not None else spread_items(rollout, 20)
    low, high = -12.0, 12.0   # run-logit thresholds: fraction falls as the threshold rises
    best = None
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        set_threshold(model, 1.0 / (1.0 + math.exp(-middle)))
        fraction = generation_fraction(model, rollout, items, cache_config)
        if best is None or abs(fraction - budget) < abs(best[1] - budget):
            best = (middle, fraction)
        if fraction > budget:
            low = middle
        else:
            high = middle
    set_threshold(model, 1.0 / (1.0 + math.exp(-best[0])))
    return state.config.threshold


def spread_items(rollout: Rollout, count: int) -> list:
    """About ``count`` items spread over the pool (class-balanced for ``ClassConditionalRollout``, whose pool
    lists classes in turn): the generations a fraction is measured or a threshold calibrated on. With 10 (one
    per class of the reference model) cheap enough to recalibrate every few training steps."""
    return list(rollout.pool[::max(1, len(rollout.pool) // count)])


def set_threshold(model: nn.Module, threshold: float) -> None:
    state = state_of(model)
    state.config = dataclasses.replace(state.config, threshold=float(threshold))


def train_through_rollouts(model: nn.Module, rollout: Rollout, *, budget: float, steps: int, lr: float,
                           batch_size: int, seed: int, budget_weight: float, dual_step: float, dual_init: float,
                           lr_schedule: str,
                           cache_max_reuse: int, calibrate: bool, log_every: int, checkpoint_dir, checkpoint_every: int,
                           progress: bool, log, resume: bool = False, precision=None,
                           shard_base: bool = False, recalibrate_every: int = 0,
                           recalibrate_iterations: int = 8) -> TrainReport:
    """The ``objective="rollout"`` loop of :func:`~elastic_compile.train.train_routers` (see the module doc).

    ``recalibrate_every`` N > 0: every N optimizer steps the run threshold is calibrated (hard decisions, no
    gradients, ``recalibrate_iterations`` bisection steps on :func:`spread_items` (10)) so that the served
    fraction sits on the budget while training. The forward pass decides with that threshold, so the routers train
    with the decisions they will be served with, instead of drifting off the budget and being cut back after
    training by a threshold they never saw; the multiplier stays as a secondary pressure."""
    check_rollout(rollout)
    state = state_of(model)
    rank, world = init_distributed()
    if batch_size % world:
        raise ConfigError(f"a global batch size divisible by the {world} processes", f"{batch_size}",
                          "Choose batch_size as a multiple of --nproc_per_node.")
    cache_config = serving_cache(model, cache_max_reuse)
    budget = reachable_budget(model, rollout, budget, cache_config)
    torch.manual_seed(seed)
    optimizer, scheduler, saved_flags = trainable(model, lr, steps, lr_schedule)
    router_params = [p for r in state.routers.values() for p in r.parameters()]
    was_training = model.training
    model.eval()
    precision = precision or contextlib.nullcontext
    with precision():
        targets = dense_targets(model, rollout)
    generator = torch.Generator().manual_seed(seed)
    dual = DualBudget(budget, dual_step, dual_init)
    share = batch_size // world
    report = TrainReport(budget, steps, batch_size, world, 0.0)
    run_state = None
    if checkpoint_dir:
        run_state = RunState(checkpoint_dir, model, optimizer, scheduler, {"data": generator},
                             dict(objective="rollout", budget=budget, steps=steps, lr=lr, batch_size=batch_size,
                                  seed=seed, budget_weight=budget_weight, dual_step=dual_step, dual_init=dual_init,
                                  lr_schedule=lr_schedule, cache_max_reuse=cache_max_reuse,
                                  autocast=getattr(precision, "name", None),
                                  data=f"{type(rollout).__name__}:{len(rollout.pool)}",
                                  # only when set, so runs saved before the option resume
                                  **({"recalibrate_every": recalibrate_every} if recalibrate_every else {})))
    try:
        first, elapsed = resume_run(run_state, resume, report)
    except Exception:
        restore_flags(model, saved_flags)
        model.train(was_training)
        raise
    json_log = JsonLog(checkpoint_dir, "rollout", steps, first - 1, rank == 0)
    if first > 1:
        dual.value = float(run_state.extra["dual"])
        if "threshold" in run_state.extra:
            set_threshold(model, run_state.extra["threshold"])
    sharded = None
    if world > 1 and shard_base:   # the calls' FLOP tables measured on the whole model, then the base sharded
        sharded = ShardedBase(model, world, lambda: generation_fraction(model, rollout, list(rollout.pool[:share]),
                                                                        cache_config))
    bar = progress_bar(steps, progress and rank == 0, initial=first - 1)
    start = time.time() - elapsed
    try:
        for step in range(first, steps + 1):
            rows = torch.randint(len(rollout.pool), (batch_size,), generator=generator)[rank * share:(rank + 1) * share]
            items = [rollout.pool[int(i)] for i in rows]
            with precision():
                log_mse, mse, fraction = rollout_step(model, rollout, items, targets[rows], cache_config,
                                                      call_fraction)
            budget_term = (fraction - budget) ** 2
            loss = log_mse + dual.value * fraction + budget_weight * budget_term
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if world > 1:  # every rank's routers take the mean gradient of the global batch
                for p in router_params:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            optimizer.step()
            scheduler.step()
            global_fraction = global_sum(fraction.detach()) / world
            dual.update(global_fraction)
            if recalibrate_every and step % recalibrate_every == 0 and step < steps:
                with torch.no_grad(), precision():   # the same decisions on every rank: same items, same routers
                    calibrate_threshold(model, rollout, budget, cache_config, spread_items(rollout, 10),
                                        recalibrate_iterations)
            if step % log_every == 0 or step == steps or step == 1:
                global_mse = global_sum(mse.detach()) / world
                entry = TrainLogEntry(step, global_sum(loss.detach()) / world, global_mse, float(budget_term.detach()),
                                      global_fraction, global_fraction, time.time() - start)
                report.history.append(entry)
                json_log.write(entry, first, elapsed)
                if rank == 0 and log is not None:
                    log(entry)
                bar.set_postfix(psnr=f"{psnr_of_mse(global_mse):.1f}", flops=f"{global_fraction:.3f}")
            if checkpoint_dir and checkpoint_every and (step % checkpoint_every == 0 or step == steps):
                if step < steps:
                    save = functools.partial(checkpoint, model, Path(checkpoint_dir) / f"step-{step:06d}", False)
                    if sharded is not None:
                        sharded.gathered(save)   # every rank gathers the base, rank 0 saves
                    elif rank == 0:
                        save()
                run_state.save(step, [asdict(e) for e in report.history],
                               {"seconds": time.time() - start, "dual": dual.value,
                                "threshold": state.config.threshold})
            bar.update(1)
    finally:
        bar.close()
        state.soft = False
        if sharded is not None:
            sharded.release()
        restore_flags(model, saved_flags)
        model.train(was_training)
    if calibrate:
        state.serving["threshold_calibrated"] = calibrate_threshold(model, rollout, budget, cache_config)
    report.seconds = time.time() - start
    if checkpoint_dir and rank == 0:
        checkpoint(model, Path(checkpoint_dir) / "final", False)
    return report


def call_fraction(model: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Per-sample executed FLOP fraction of the model's last call (straight-through, from its soft records)."""
    state = state_of(model)
    batch = next(v.shape[0] for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.ndim > 0)
    table = flop_table(model, state, describe_inputs(args, kwargs))
    return executed_flops_fraction(state.soft_records, table, state.routers, batch)


def chosen_skip_action(state, action: str | None) -> str:
    """``action``, or the model's last (highest-order) skip action when None; refused if the model lacks it."""
    actions = state.config.skip_actions
    action = action or actions[-1]
    if action not in actions:
        raise ConfigError(f"one of the model's skip actions {actions}", repr(action),
                          "Transform with ElasticConfig(skip_actions=...) including it.")
    return action


def start_from_block_cache(model: nn.Module, action: str | None = None, run_logit: float = -2.0) -> None:
    """Set every router to ask for a skip (run logit ``run_logit``) with skip action ``action`` (default: the
    model's last, the highest-order one), whatever it reads: served with the feature cache (fallback "run"), the
    model is then the training-free block cache (each block stands in up to ``max_reuse`` steps in a row, then
    runs). Rollout training started from here learns where running more pays and which stand-in to take, from a
    point that already generates well, instead of from "run everything" where the final-sample loss has no
    gradient yet."""
    state = state_of(model)
    actions = state.config.skip_actions
    action = chosen_skip_action(state, action)
    with torch.no_grad():
        for router in state.routers.values():
            router.reset_to_full_capacity()
            router.fc2.bias[0] = run_logit
            if router.num_actions:
                router.fc2.bias[1 + router.num_widths + actions.index(action)] = 1.0

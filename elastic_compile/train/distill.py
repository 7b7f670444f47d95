"""``train_routers``: distil the dense model into its elastic self under a compute budget.

Loss per step (global batch of B samples)::

    L = mean_i MSE(student_i, teacher_i) + budget_weight * (mean_i E[FLOPs_i] / FLOPs_dense - budget)^2
        (+ task_weight * task_loss(model, batch) when a task loss is given)

Teacher: the same model forced dense (``force(skip=False, width=1.0)``) under no_grad, so no second copy of
the weights exists; for a recorded trajectory dataset the teacher outputs are computed once up front.
Student: the elastic model with straight-through decisions (see ``BlockGate.soft_forward``). By default only
router parameters train and the base weights stay bit-identical.

Cache-aware (``cache_aware=True``): a skip is trained as the feature cache runs it, reusing the block's update
from the previous sampling step (train/cache_aware.py).

Distributed: under ``torchrun`` (torch.distributed initialised, or WORLD_SIZE > 1 in the environment), each rank
takes its contiguous share of the same seeded global batch; the model is wrapped in DistributedDataParallel
(gloo on CPU, nccl on GPU) and the loss is scaled so that the averaged gradient equals the gradient of the
global-batch loss above: N processes train the same routers as one process with the same global batch. With
``shard_base`` the frozen base is sharded across the ranks by FSDP2 instead (train/sharding.py), routers as under DDP.
"""
from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from ..cache import FeatureCacheConfig
from ..errors import ConfigError
from ..nn.gate.profile import flop_table
from ..sampling import denoiser_output
from ..state import describe_inputs, force, state_of
from ..stats import stats
from .budget import executed_flops_fraction
from .cache_aware import dense_stand_ins, require_step_links
from .common import (PRECISIONS, JsonLog, TrainLogEntry, TrainReport, checkpoint, global_mean, global_sum,
                     init_distributed, precision, progress_bar, restore_flags, resume_run, trainable)
from .resume import RunState
from .rollout import train_through_rollouts
from .sharding import ShardedBase, first_batch_probe
from .store import EpochSampler, TrajectoryStore
from .trajectories import TEACHER_KEY, TrajectoryDataset

OBJECTIVES = ("step", "rollout")


def train_routers(model: nn.Module, data: TrajectoryDataset | Iterable[dict], *, budget: float = 0.5,
                  steps: int = 300, lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                  budget_weight: float = 10.0, lr_schedule: str = "cosine", cache_aware: bool = False,
                  cache_max_reuse: int = 2, train_base: bool = False, base_lr: float = 1e-5,
                  task_loss: Callable[[nn.Module, dict], torch.Tensor] | None = None, task_weight: float = 1.0,
                  log_every: int = 25, checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
                  progress: bool = True, log: Callable[[TrainLogEntry], None] | None = None,
                  objective: str = "step", dual_step: float = 2.0, dual_init: float = 10.0,
                  calibrate: bool = True, resume: bool = False, activation_checkpointing: bool = False,
                  autocast: str | None = None, shard_base: bool = False, recalibrate_every: int = 0) -> TrainReport:
    """Train the routers of an elastic model (from ``transform``/``load``) towards ``budget`` FLOP fraction.

    Args:
        data: a :class:`TrajectoryDataset` (e.g. from ``record_class_conditional_trajectories``), sampled with a
            seeded generator, a :class:`~elastic_compile.train.store.TrajectoryStore` on disk (streamed in
            rank-disjoint seeded epochs, train/store.py), or an iterable of keyword-argument batches (each one
            global batch).
        budget: target executed FLOP fraction in (0, 1].
        steps, lr, batch_size (global), seed: optimisation settings (Adam).
        budget_weight: weight of the squared budget deviation.
        lr_schedule: "cosine" (decay to 10% of ``lr`` over the run, lets decisions settle) or "constant".
        cache_aware: train skips as the feature cache executes them (reuse of the previous step's block update,
            see train/cache_aware.py), for models served with ``apply_feature_cache(model,
            FeatureCacheConfig(max_reuse=cache_max_reuse, fallback="run"))``. Needs a TrajectoryDataset with step
            links. Skips are trained on updates 1..cache_max_reuse steps old, and the budget charges a skip
            1 / (cache_max_reuse + 1) of the block (the refresh run the cache forces).
        train_base: also fine-tune the base weights (needs a frozen teacher: precomputed for a dataset, a deep
            copy otherwise); ``base_lr`` is their learning rate.
        task_loss: optional extra loss on data, e.g. a flow-matching loss, computed on the student.
        checkpoint_dir / checkpoint_every: ``ec.save`` checkpoints every N steps and at the end ("final"), and
            with them the run's full state (``resume-step.safetensors``: optimizer, schedule, random states, data
            position; train/resume.py), written atomically.
        resume: continue from ``checkpoint_dir``'s saved state when there is one (same settings, checked): the
            resumed run ends bitwise-equal to one that was never interrupted.
        activation_checkpointing: recompute each block's activations in backward instead of keeping them (memory
            of one block's activations instead of all; the same gradients; nn/gate/soft.py).
        autocast: "bf16" or "fp16": run the frozen base (student and teacher) under ``torch.autocast`` on the
            model's device; routers, their gradients and optimizer state stay float32.
        shard_base: under torchrun, shard the frozen base across the processes with FSDP2 instead of replicating
            it with DDP (each rank keeps 1/world of the base weights between uses; routers stay replicated and
            train as under DDP; train/sharding.py). The model leaves training whole again. Not with train_base.
        log: called with every logged entry (rank 0).
        objective: "step" (the per-call distillation above, on ``data``: a trajectory dataset or batches) or
            "rollout" (train/rollout.py: whole generations with the feature cache in the loop, loss on the final
            samples; ``data`` is then a rollout such as ``ClassConditionalRollout(scheduler, sampling_config)``,
            the cache is the one served, ``cache_max_reuse`` its K; the budget's Lagrange multiplier starts at
            ``dual_init`` (the log-MSE a unit of FLOP fraction buys near the budget: ~10 on the reference model)
            and moves by ``dual_step`` times the overshoot per step; ``calibrate`` then sets the run threshold so
            whole generations meet the budget).
            ``recalibrate_every`` N > 0 recalibrates that threshold every N steps during training, so the
            routers train with the hard decisions they are served with and the served fraction sits on the budget
            (the multiplier then only a secondary pressure).
            Rollout training is cache-aware by construction and starts from whatever the routers know (e.g.
            after a cheaper ``objective="step"`` run).
    """
    check_train_options(budget=budget, steps=steps, lr=lr, batch_size=batch_size, budget_weight=budget_weight,
                        cache_max_reuse=cache_max_reuse, base_lr=base_lr, log_every=log_every,
                        checkpoint_every=checkpoint_every, lr_schedule=lr_schedule, task_weight=task_weight,
                        recalibrate_every=recalibrate_every)
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective in {OBJECTIVES}", repr(objective),
                          "Use 'step' (per-call distillation) or 'rollout' (whole generations, cache in the loop).")
    if autocast not in PRECISIONS:
        raise ConfigError(f"autocast in {sorted(PRECISIONS, key=str)}", repr(autocast),
                          "Use 'bf16' on GPUs that have it (or 'fp16'), None for the model's own dtype.")
    if shard_base and train_base:
        raise ConfigError("a frozen base with shard_base (only routers train on a sharded base)", "train_base=True",
                          "Fine-tune the base without shard_base (DDP), or train routers only.")
    state = state_of(model)
    state.soft_checkpoint = activation_checkpointing
    try:
        return _train(model, data, budget=budget, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                      budget_weight=budget_weight, lr_schedule=lr_schedule, cache_aware=cache_aware,
                      cache_max_reuse=cache_max_reuse, train_base=train_base, base_lr=base_lr, task_loss=task_loss,
                      task_weight=task_weight, log_every=log_every, checkpoint_dir=checkpoint_dir,
                      checkpoint_every=checkpoint_every, progress=progress, log=log, objective=objective,
                      dual_step=dual_step, dual_init=dual_init, calibrate=calibrate, resume=resume,
                      precision=precision(model, autocast), shard_base=shard_base,
                      recalibrate_every=recalibrate_every)
    finally:
        state.soft_checkpoint = False


def _train(model, data, *, budget, steps, lr, batch_size, seed, budget_weight, lr_schedule, cache_aware,
           cache_max_reuse, train_base, base_lr, task_loss, task_weight, log_every, checkpoint_dir, checkpoint_every,
           progress, log, objective, dual_step, dual_init, calibrate, resume, precision, shard_base,
           recalibrate_every=0) -> TrainReport:
    if objective == "rollout":
        if train_base or task_loss is not None:
            raise ConfigError("router-only rollout training", "train_base or task_loss with objective='rollout'",
                              "Fine-tune the base with objective='step'; rollouts train routers only.")
        return train_through_rollouts(model, data, budget=budget, steps=steps, lr=lr, batch_size=batch_size,
                                      seed=seed, budget_weight=budget_weight, dual_step=dual_step, dual_init=dual_init,
                                      lr_schedule=lr_schedule, cache_max_reuse=cache_max_reuse, calibrate=calibrate,
                                      log_every=log_every, checkpoint_dir=checkpoint_dir,
                                      checkpoint_every=checkpoint_every, progress=progress, log=log,
                                      resume=resume, precision=precision, shard_base=shard_base,
                                      recalibrate_every=recalibrate_every)
    state = state_of(model)
    skip_cost = 0.0
    if cache_aware:
        require_step_links(data)
        skip_cost = 1.0 / (cache_max_reuse + 1)
        # saved with the routers: apply_feature_cache(model) then serves what was trained
        state.serving["feature_cache"] = {"max_reuse": cache_max_reuse, "fallback": "run",
                                         "forecast_min_points": FeatureCacheConfig.forecast_min_points}
    else:
        state.serving.pop("feature_cache", None)
    rank, world = init_distributed()
    if batch_size % world:
        raise ConfigError(f"a global batch size divisible by the {world} processes", f"{batch_size}",
                          "Choose batch_size as a multiple of --nproc_per_node.")
    torch.manual_seed(seed)
    optimizer, scheduler, saved_flags = trainable(model, lr, steps, lr_schedule, train_base, base_lr)
    was_training = model.training
    model.eval()  # no dropout / label dropout: the student must see what the teacher sees
    with precision():
        teacher = _teacher(model, data, train_base)   # before a resume loads fine-tuned base weights
    data_generator = torch.Generator().manual_seed(seed)
    staleness_generator = torch.Generator().manual_seed(seed + 1 + rank)
    report = TrainReport(budget, steps, batch_size, world, 0.0)
    run_state = None
    if checkpoint_dir:
        run_state = RunState(checkpoint_dir, model, optimizer, scheduler,
                             {"data": data_generator, "staleness": staleness_generator},
                             dict(objective="step", budget=budget, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                                  budget_weight=budget_weight, lr_schedule=lr_schedule, cache_aware=cache_aware,
                                  cache_max_reuse=cache_max_reuse, train_base=train_base, base_lr=base_lr,
                                  task_weight=task_weight, autocast=precision.name, data=_describe(data)),
                             train_base)
    try:
        first, elapsed = resume_run(run_state, resume, report)
    except Exception:
        restore_flags(model, saved_flags)
        model.train(was_training)
        raise
    json_log = JsonLog(checkpoint_dir, "step", steps, first - 1, rank == 0)
    batches = _batches(data, batch_size, rank, world, data_generator, first - 1)
    student, sharded = model, None
    if world > 1 and shard_base:
        batches, probe = first_batch_probe(model, batches)
        sharded = ShardedBase(model, world, probe)
    elif world > 1:
        student = nn.parallel.DistributedDataParallel(model, find_unused_parameters=train_base)
    bar = progress_bar(steps, progress and rank == 0, initial=first - 1)
    start = time.time() - elapsed
    served_cache, state.cache = state.cache, None  # the cache ec.load serves with: steps train without it
    try:
        for step in range(first, steps + 1):
            inputs, rows = next(batches)
            target = inputs.pop(TEACHER_KEY, None)
            with precision():
                if cache_aware:
                    state.soft_stand_ins = dense_stand_ins(model, data, rows, (TEACHER_KEY,), cache_max_reuse,
                                                           staleness_generator)
                if target is None:
                    with torch.no_grad():
                        target = teacher(inputs)
            state.soft = True
            try:
                with precision():
                    output = denoiser_output(student(**inputs)).float()
            finally:
                state.soft = False
                state.soft_stand_ins = None
            local = output.shape[0]
            distill = (output - target.float()).pow(2).reshape(local, -1).mean(dim=1)
            table = flop_table(model, state, describe_inputs((), inputs))
            fractions = executed_flops_fraction(state.soft_records, table, state.routers, local, skip_cost)
            global_fraction = global_mean(fractions, batch_size)
            budget_term = (global_fraction - budget) ** 2
            loss = distill.sum() / batch_size + budget_weight * budget_term / world
            task_value = None
            if task_loss is not None:
                task = task_loss(model, inputs)
                task_value = float(task)
                loss = loss + task_weight * task / world
            optimizer.zero_grad(set_to_none=True)
            (loss * world).backward()
            if sharded is not None:
                sharded.average_gradients()
            optimizer.step()
            scheduler.step()
            if step % log_every == 0 or step == steps or step == 1:
                entry = TrainLogEntry(step, float(global_sum(loss.detach()) ), global_sum(distill.detach().sum()) / batch_size,
                                      float(budget_term.detach()), float(global_fraction.detach()),
                                      _executed_fraction(model), time.time() - start, task_value)
                report.history.append(entry)
                json_log.write(entry, first, elapsed)
                if rank == 0 and log is not None:
                    log(entry)
                bar.set_postfix(mse=f"{entry.distill_mse:.4g}", flops=f"{entry.executed_fraction:.3f}")
            if checkpoint_dir and checkpoint_every and (step % checkpoint_every == 0 or step == steps):
                if step < steps:
                    save = functools.partial(checkpoint, model, Path(checkpoint_dir) / f"step-{step:06d}", train_base)
                    if sharded is not None:
                        sharded.gathered(save)   # every rank gathers the base, rank 0 saves
                    elif rank == 0:
                        save()
                run_state.save(step, [asdict(e) for e in report.history], {"seconds": time.time() - start})
            bar.update(1)
    finally:
        bar.close()
        state.soft = False
        state.soft_stand_ins = None
        if sharded is not None:
            sharded.release()
        restore_flags(model, saved_flags)
        model.train(was_training)
        state.cache = served_cache
    report.seconds = time.time() - start
    if checkpoint_dir and rank == 0:
        checkpoint(model, Path(checkpoint_dir) / "final", train_base)
    return report


#: Per option of :func:`train_routers`: (kind, lowest, highest, whether the lowest is allowed).
_OPTIONS = {"budget": (float, 0.0, 1.0, False), "steps": (int, 1, None, True), "lr": (float, 0.0, None, False),
            "batch_size": (int, 1, None, True), "budget_weight": (float, 0.0, None, True),
            "cache_max_reuse": (int, 1, None, True), "base_lr": (float, 0.0, None, False),
            "log_every": (int, 1, None, True), "checkpoint_every": (int, 0, None, True),
            "task_weight": (float, 0.0, None, True), "recalibrate_every": (int, 0, None, True)}


def check_train_options(**options) -> None:
    """ConfigError for an option of :func:`train_routers` of the wrong type or out of range (NaN included);
    the command line calls it before recording trajectories, so a bad value costs nothing."""
    for name, value in options.items():
        if name == "lr_schedule":
            if value not in ("cosine", "constant"):
                raise ConfigError("lr_schedule in {'cosine', 'constant'}", repr(value), "Use 'cosine'.")
            continue
        kind, low, high, closed = _OPTIONS[name]
        typed = not isinstance(value, bool) and isinstance(value, int if kind is int else (int, float))
        within = typed and math.isfinite(value) and (value >= low if closed else value > low) and \
            (high is None or value <= high)
        if not within:
            bounds = f"{'[' if closed else '('}{low}, {high if high is not None else 'inf'}{']' if high is not None else ')'}"
            raise ConfigError(f"{name}: {'an integer' if kind is int else 'a number'} in {bounds}", repr(value),
                              "Fix the option (e.g. budget=0.5, steps=300).")


def _describe(data) -> str:
    """What a resumed run checks it is given the same data as (kind and size; contents are not hashed)."""
    sized = isinstance(data, (TrajectoryDataset, TrajectoryStore))
    return f"{type(data).__name__}:{len(data)}" if sized else type(data).__name__


def _batches(data, batch_size: int, rank: int, world: int, generator: torch.Generator, done: int = 0):
    """This rank's share of each global batch. ``generator`` (seeded, or restored by a resume) draws dataset
    rows; from an iterable of batches, a resumed run skips the ``done`` batches it already trained on."""
    share = batch_size // world
    if isinstance(data, TrajectoryStore):   # streamed: rank-disjoint epochs, stateless in the step number
        sampler = EpochSampler(len(data), batch_size, int(generator.initial_seed()))
        b = done
        while True:
            indices = sampler.share(b, rank, world)
            b += 1
            yield data.batch(indices), indices
    elif isinstance(data, TrajectoryDataset):
        while True:
            indices = torch.randint(len(data), (batch_size,), generator=generator)[rank * share:(rank + 1) * share]
            yield data.batch(indices), indices
    else:
        seen = 0
        while True:
            for batch in data:
                seen += 1
                if seen <= done:
                    continue
                yield {k: (v[rank * share:(rank + 1) * share]
                           if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == batch_size else v)
                       for k, v in dict(batch).items()}, None


def _teacher(model: nn.Module, data, train_base: bool) -> Callable[[dict], torch.Tensor]:
    """Dense predictions: precomputed into a dataset, else the model forced dense (a frozen copy if the base trains)."""
    if isinstance(data, TrajectoryDataset) and TEACHER_KEY not in data.rows:
        outputs = []
        with torch.no_grad(), force(model, skip=False, width=1.0):
            for start in range(0, len(data), 256):
                index = torch.arange(start, min(start + 256, len(data)))
                outputs.append(denoiser_output(model(**data.batch(index))).float().cpu())
        data.rows[TEACHER_KEY] = torch.cat(outputs)
    reference = model   # a store holds the recorded dense outputs: this is only its fallback
    if train_base and not isinstance(data, TrajectoryDataset) and not getattr(data, "has_teacher", False):
        import copy
        reference = copy.deepcopy(model)

    def teach(inputs: dict) -> torch.Tensor:
        with force(reference, skip=False, width=1.0):
            return denoiser_output(reference(**inputs))
    return teach


def _executed_fraction(model: nn.Module) -> float:
    return float(stats(model).executed_flops_fraction)


"""``stats(model)``: what the last forward decided, per block and per sample, and the FLOPs it executed."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import ConfigError
from .nn.gate.profile import flop_table
from .state import state_of


@dataclass(frozen=True)
class Decision:
    """One block, one sample: did it run, at which width (None when skipped), and did a skip reuse the
    cached residual of an earlier step (feature cache)."""

    run: bool
    width: float | None
    reused: bool = False


@dataclass
class ElasticStats:
    """Decisions and executed FLOPs of the last forward.

    ``decisions[i][s]``: block ``i`` (run order), sample ``s`` (first call of the block in the forward).
    ``executed_flops_fraction``: executed FLOPs of the whole batch / dense FLOPs (router FLOPs included when
    routers ran; FLOPs of matmuls, convolutions and attention, counted by ``analysis.flop_counter``).
    ``decided_flops_fraction``: what the decisions cost, each sample at its own plan (the default gate executes
    exactly that; under device routing a block runs once for the whole batch at the widest bucket any running
    sample chose, so a batch whose samples disagree executes more: ``nn/gate/device.py``).
    ``per_sample_flops_fraction``: the decided cost per sample.
    """

    block_paths: list[str]
    decisions: list[list[Decision]]
    executed_flops_fraction: float
    per_sample_flops_fraction: list[float]
    dense_flops: int
    executed_flops: int
    router_flops: int
    decided_flops_fraction: float

    @property
    def skipped_fraction(self) -> float:
        """Share of (block, sample) decisions that did not run the block (cache reuses included)."""
        flat = [d for block in self.decisions for d in block]
        return sum(not d.run for d in flat) / max(1, len(flat))

    @property
    def reused_fraction(self) -> float:
        """Share of (block, sample) decisions that the feature cache served instead of the block."""
        flat = [d for block in self.decisions for d in block]
        return sum(d.reused for d in flat) / max(1, len(flat))

    def mean_width(self) -> float:
        widths = [d.width for block in self.decisions for d in block if d.run]
        return sum(widths) / max(1, len(widths))


def stats(model: nn.Module) -> ElasticStats:
    """Decisions and executed FLOPs of the model's last forward (FLOPs profiled once per input signature)."""
    state = state_of(model)
    calls = state.settled_calls()
    if state.last_inputs is None or not calls:
        raise ConfigError("a forward of the elastic model before stats()", "no forward recorded",
                          "Run the model once, then call elastic_compile.stats(model).")
    table = flop_table(model, state, state.last_inputs)
    buckets = state.config.width_buckets
    batch = len(calls[0].run)
    per_sample = [table.non_block / batch] * batch
    router_total = 0
    batched_excess = 0.0  # device routing: FLOPs run beyond the decisions (whole batch at the widest bucket)
    occurrences: dict[int, int] = {}
    profiled = {}
    for block, flops in table.block_calls:
        profiled.setdefault(block, []).append(flops)
    decisions: list[list[Decision] | None] = [None] * len(state.specs)
    for call in calls:
        k = occurrences.get(call.block, 0)
        occurrences[call.block] = k + 1
        flops = profiled[call.block][k]
        call_batch = len(call.run)
        router = state.routers.get(call.block)
        router_per_sample = router.flops_per_sample() if (call.router_ran and router is not None) else 0
        for s, (run, bucket) in enumerate(zip(call.run, call.bucket)):
            if s < batch:
                per_sample[s] += (flops[bucket] / call_batch if run else 0.0) + router_per_sample
        router_total += router_per_sample * call_batch
        if call.batched:
            running = [b for r, b in zip(call.run, call.bucket) if r]
            batched_excess += (flops[max(running)] if running else 0.0) - sum(flops[b] / call_batch for b in running)
        if decisions[call.block] is None:
            reused = call.reused or [False] * len(call.run)
            decisions[call.block] = [Decision(r, buckets[b] if r else None, u)
                                     for r, b, u in zip(call.run, call.bucket, reused)]
    dense_per_sample = table.dense_total / batch
    decided = sum(per_sample)
    return ElasticStats(
        block_paths=[spec.path for spec in state.specs],
        decisions=[d or [] for d in decisions],
        executed_flops_fraction=(decided + batched_excess) / table.dense_total,
        per_sample_flops_fraction=[f / dense_per_sample for f in per_sample],
        dense_flops=int(table.dense_total),
        executed_flops=int(round(decided + batched_excess)),
        router_flops=int(router_total),
        decided_flops_fraction=decided / table.dense_total,
    )


class StepStats:
    """An ``on_step_end`` callback for :func:`elastic_compile.sampling.sample` that keeps ``stats(model)`` after
    every denoising step, so that a generation is described by the mean over its steps (what the demo and
    ``elastic-compile run`` report): the last step alone can be far from it, e.g. with a feature cache that
    refreshes a block every few steps."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.steps: list[ElasticStats] = []

    def __call__(self, step, latents) -> None:
        self.steps.append(stats(self.model))

    def mean(self, name: str) -> float:
        return sum(getattr(s, name) for s in self.steps) / max(1, len(self.steps))

    @property
    def executed_flops_fraction(self) -> float:
        return self.mean("executed_flops_fraction")

    @property
    def skipped_fraction(self) -> float:
        return self.mean("skipped_fraction")

    @property
    def reused_fraction(self) -> float:
        return self.mean("reused_fraction")

"""Does per-sample routing pay? The same routers' decisions averaged per step over samples, served as a schedule.

E-DiT's premise is that the compute a sample needs varies from sample to sample. To test it on a router set,
:func:`averaged_schedule` records the routers' decisions on calibration generations (per step, block and sample:
run or not, and the skip action) and keeps, per (step, block), how often the block ran and the action chosen
most often. :class:`ScheduleRouter` then serves that table to every sample alike: the (step, block) cells that ran
most often run, as many of them as ran on average (equal FLOPs up to the cache's own rules), the others take
their most frequent action. If the routed model beats its own schedule, the per-sample decisions are worth
something; if not, what the routers learned is a per-step, per-block schedule.
"""
from __future__ import annotations

from collections import Counter

import torch

from elastic_compile.state import gate_of
from elastic_compile.sampling import sample
from elastic_compile.sampling.hooks import SamplerHooks
from elastic_compile.state import state_of

SURE = 20.0  # a logit no threshold in (0, 1) mistakes


class StepCounter(SamplerHooks):
    """Sampler hooks that count the denoiser calls of a generation (around the hooks they wrap)."""

    def __init__(self, inner: SamplerHooks | None):
        self.inner = inner or SamplerHooks()
        self.step = -1

    def start_generation(self):
        self.step = -1
        self.inner.start_generation()

    def end_generation(self):
        self.inner.end_generation()

    def branch(self, name, step):
        self.step = step.step_index
        return self.inner.branch(name, step)


class RecordingRouter:
    """Stands in for a router while calibration generations run: its logits, recorded per step."""

    def __init__(self, router, counter: StepCounter, log: dict):
        self.router, self.counter, self.log = router, counter, log
        self.num_widths, self.num_actions = router.num_widths, router.num_actions

    def logits(self, arguments):
        out = self.router.logits(arguments)
        self.log.setdefault(self.counter.step, []).append(out.detach().clone())
        return out

    def __call__(self, arguments):
        return self.router(arguments)


class ScheduleRouter:
    """Serves one row of logits per step to every sample: run or not, dense width, the step's action."""

    def __init__(self, router, counter: StepCounter, runs: dict[int, bool], actions: dict[int, int]):
        self.counter, self.runs, self.actions = counter, runs, actions
        self.num_widths, self.num_actions = router.num_widths, router.num_actions

    def logits(self, arguments):
        batch = next(v.shape[0] for v in arguments.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        row = torch.full((1 + self.num_widths + self.num_actions,), -SURE)
        step = self.counter.step
        row[0] = SURE if self.runs.get(step, True) else -SURE
        row[self.num_widths] = SURE                        # the dense width (the last bucket)
        if self.num_actions:
            row[1 + self.num_widths + self.actions.get(step, 0)] = SURE
        return row.expand(batch, -1)


def averaged_schedule(model, hooks, scheduler, config, labels, seed: int = 900):
    """Per block: ``(runs {step: bool}, actions {step: action})`` averaged over the samples of calibration
    generations (module doc). Leaves the model's routers as they were."""
    state = state_of(model)
    threshold = state.config.threshold
    counter, logs = StepCounter(hooks), {}
    gates = {index: gate_of(state.blocks[index]) for index in state.routers}
    saved = {index: gate.router for index, gate in gates.items()}
    try:
        for index, gate in gates.items():
            gate.router = RecordingRouter(saved[index], counter, logs.setdefault(index, {}))
        with torch.no_grad():
            sample(model, scheduler, labels, config, seed=seed, hooks=counter)
    finally:
        for index, gate in gates.items():
            gate.router = saved[index]
    frequency, actions = {}, {}
    for index, steps in logs.items():
        router = saved[index]
        for step, rows in steps.items():
            logits = torch.cat(rows)
            frequency[index, step] = float((torch.sigmoid(logits[:, 0]) >= threshold).float().mean())
            if router.num_actions:
                chosen = logits[:, 1 + router.num_widths:].argmax(dim=-1).tolist()
                actions.setdefault(index, {})[step] = Counter(chosen).most_common(1)[0][0]
    keep = round(sum(frequency.values()))           # as many (block, step) runs as the routers made on average
    ranked = sorted(frequency, key=lambda cell: -frequency[cell])
    running = set(ranked[:keep])
    return {index: ({step: (index, step) in running for (i, step) in frequency if i == index},
                    actions.get(index, {})) for index in logs}


class ScheduledModel:
    """The model with every router replaced by its averaged schedule; a denoiser for ``sample`` (with ``hooks``)."""

    def __init__(self, model, schedule: dict, hooks: SamplerHooks | None):
        self.model = model
        self.hooks = StepCounter(hooks)
        state = state_of(model)
        for index, (runs, actions) in schedule.items():
            gate = gate_of(state.blocks[index])
            gate.router = ScheduleRouter(gate.router, self.hooks, runs, actions)

    def __call__(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def parameters(self):
        return self.model.parameters()

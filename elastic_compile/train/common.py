"""What both training objectives share: the report, trainable parameters, distributed sums, checkpoints, progress."""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn

from ..errors import ConfigError
from ..serialization import save
from ..state import state_of


@dataclass
class TrainLogEntry:
    step: int
    loss: float
    distill_mse: float
    budget_term: float
    expected_fraction: float
    executed_fraction: float
    seconds: float
    task_loss: float | None = None


@dataclass
class TrainReport:
    """What training did: settings, the logged history, and the final executed FLOP fraction / distillation MSE."""

    budget: float
    steps: int
    batch_size: int
    world_size: int
    seconds: float
    history: list[TrainLogEntry] = field(default_factory=list)

    @property
    def final(self) -> TrainLogEntry:
        return self.history[-1]

    def to_dict(self) -> dict:
        return asdict(self)


def trainable(model: nn.Module, lr: float, steps: int, lr_schedule: str = "cosine", train_base: bool = False,
              base_lr: float = 1e-5):
    """Make the routers (and the base, with ``train_base``) trainable: ``(Adam, LR schedule, saved flags)``; the
    flags restore every parameter's ``requires_grad`` afterwards (:func:`restore_flags`)."""
    state = state_of(model)
    router_params = [p for r in state.routers.values() for p in r.parameters()]
    if not router_params:
        raise ConfigError("a model with at least one router", "no routers", "See elastic_compile.report(model).")
    if lr_schedule not in ("cosine", "constant"):
        raise ConfigError("lr_schedule in {'cosine', 'constant'}", repr(lr_schedule), "Use 'cosine'.")
    router_ids = {id(p) for p in router_params}
    base_params = [p for p in model.parameters() if id(p) not in router_ids]
    saved_flags = [p.requires_grad for p in model.parameters()]
    for p in base_params:
        p.requires_grad_(train_base)
    for p in router_params:
        p.requires_grad_(True)
    groups = [{"params": router_params, "lr": lr}] + ([{"params": base_params, "lr": base_lr}] if train_base else [])
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: 1.0 if lr_schedule == "constant" else 0.1 + 0.45 * (1 + math.cos(math.pi * i / steps)))
    return optimizer, scheduler, saved_flags


def restore_flags(model: nn.Module, saved_flags: list[bool]) -> None:
    for p, flag in zip(model.parameters(), saved_flags):
        p.requires_grad_(flag)


def init_distributed() -> tuple[int, int]:
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def global_sum(value: torch.Tensor) -> float:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
    return float(value)


def global_mean(per_sample: torch.Tensor, global_batch: int) -> torch.Tensor:
    """Mean over the global batch whose value is exact and whose gradient reaches this rank's samples."""
    local = per_sample.sum()
    total = local.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return (local + (total - local.detach())) / global_batch


#: ``train_routers(autocast=...)``: the dtype the frozen base runs in under ``torch.autocast``.
PRECISIONS = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision(model: nn.Module, autocast: str | None):
    """A factory of contexts running the base in ``autocast``'s dtype (a no-op context for None)."""
    device = next(model.parameters()).device.type

    def context():
        if autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=PRECISIONS[autocast])
    context.name = autocast   # part of a resumable run's settings
    return context


def checkpoint(model: nn.Module, path: Path, with_base: bool) -> None:
    save(model, path, include_base_weights=with_base)


class JsonLog:
    """``<checkpoint_dir>/train_log.jsonl``: one JSON line per logged step (rank 0) with the run's objective, the
    entry's fields and an ETA from the pace so far, readable while a long run goes on. A run starts by dropping
    its objective's lines of steps after ``resumed_at`` (all of them for a fresh run: 0), which it trains again."""

    def __init__(self, directory, objective: str, steps: int, resumed_at: int, enabled: bool):
        self.path = Path(directory) / "train_log.jsonl" if directory and enabled else None
        self.objective, self.steps = objective, steps
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        for line in (self.path.read_text().splitlines() if self.path.exists() else []):
            try:
                entry = json.loads(line)
            except ValueError:
                continue   # a line cut by a kill
            if entry.get("objective") != objective or entry.get("step", 0) <= resumed_at:
                kept.append(line)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, entry: TrainLogEntry, first_step: int, seconds_before: float) -> None:
        if self.path is None:
            return
        done = entry.step - first_step + 1
        pace = (entry.seconds - seconds_before) / max(done, 1)
        record = {"objective": self.objective, **asdict(entry), "eta_seconds": round(pace * (self.steps - entry.step), 1)}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total: int, enabled: bool, initial: int = 0):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="training routers")


def resume_run(run_state, resume: bool, report: TrainReport) -> tuple[int, float]:
    """``(first step to run, seconds already spent)``: restored from ``run_state`` when resuming and a saved
    state exists (its history goes into ``report``), else ``(1, 0.0)``."""
    if resume and run_state is None:
        raise ConfigError("a checkpoint directory to resume from", "resume=True without checkpoint_dir",
                          "Pass checkpoint_dir (the CLI's --out) and checkpoint_every.")
    restored = run_state.restore() if resume else None   # raises before any step: the caller restores flags
    if restored is None:
        return 1, 0.0
    step, history, extra = restored
    report.history.extend(TrainLogEntry(**entry) for entry in history)
    return step + 1, float(extra.get("seconds", 0.0))

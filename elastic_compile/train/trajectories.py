"""Training inputs for routers: the dense model's own sampling trajectories, recorded per sample.

Data-free router training (the default for the reference model) needs realistic noisy inputs x_t with their
timesteps and conditioning. ``record_trajectories`` runs any sampling loop with a recording denoiser (the
elastic model forced dense) and keeps every call's keyword arguments split into per-sample rows, so training
can draw mini-batches that mix steps, classes and guidance branches.

When the sampler drives the recorder's hooks too (``hooks=recorder``), every row also knows the row of the same
sample at the previous step of its generation and branch (``TrajectoryDataset.previous``): what cache-aware
router training needs to reproduce the feature cache's "reuse the last step's block update".
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ConfigError
from ..sampling import SamplerHooks, sample
from ..state import force

DATASET_FORMAT = "elastic_compile.trajectories/1"
TEACHER_KEY = "__teacher__"  # train_routers' cached teacher outputs: recomputed, never saved
_GENERATION = "__generation__"
_BRANCH = "__branch__"


@dataclass
class TrajectoryDataset:
    """Per-sample model inputs: ``rows[name]`` is an (N, ...) tensor of batch-leading arguments; ``shared``
    holds arguments that are the same for every call (non-tensors, tensors without a batch dimension)."""

    rows: dict[str, torch.Tensor]
    shared: dict[str, Any]
    previous: torch.Tensor | None = None   # (N,) row of the same sample one step earlier, -1 at a first step

    def __len__(self) -> int:
        return next(iter(self.rows.values())).shape[0]

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of one model call made of rows ``indices``."""
        return {**self.shared, **{k: v.index_select(0, indices) for k, v in self.rows.items()}}

    def to(self, device) -> "TrajectoryDataset":
        return TrajectoryDataset({k: v.to(device) for k, v in self.rows.items()}, self.shared, self.previous)

    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset as one safetensors file (what ``elastic-compile train --data`` reads): rows and
        tensor arguments as tensors, the other shared arguments as JSON in its metadata."""
        from safetensors.torch import save_file

        constants = {k: v for k, v in self.shared.items() if not isinstance(v, torch.Tensor)}
        if not all(isinstance(v, (type(None), bool, int, float, str)) for v in constants.values()):
            raise ConfigError("shared arguments that are tensors or plain values (None, bool, numbers, strings)",
                              f"{sorted(k for k, v in constants.items())}", "Pass such arguments only.")
        tensors = {f"rows.{k}": v.contiguous() for k, v in self.rows.items() if k != TEACHER_KEY}
        tensors.update({f"shared.{k}": v.contiguous() for k, v in self.shared.items() if isinstance(v, torch.Tensor)})
        if self.previous is not None:
            tensors["previous"] = self.previous.contiguous()
        save_file(tensors, str(path), metadata={"constants": json.dumps(constants), "format": DATASET_FORMAT})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrajectoryDataset":
        """Read a file written by :meth:`save` (safetensors and JSON: nothing in it can run code)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            constants = json.loads(metadata.get("constants", "{}"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"a trajectory dataset file (TrajectoryDataset.save) at {path}",
                              f"{type(exc).__name__}: {exc}", "Record the dataset again.") from exc
        rows = {k[len("rows."):]: v for k, v in tensors.items() if k.startswith("rows.")}
        lengths = {v.shape[0] if v.ndim else -1 for v in rows.values()}
        previous = tensors.get("previous")
        if (metadata.get("format") != DATASET_FORMAT or not isinstance(constants, dict) or len(lengths) != 1
                or min(lengths) < 1 or (previous is not None and previous.shape != (min(lengths),))):
            raise ConfigError(f"a trajectory dataset written by TrajectoryDataset.save at {path}",
                              f"format {metadata.get('format')!r}, row counts {sorted(lengths)}",
                              "Record the dataset again.")
        shared = {**constants, **{k[len("shared."):]: v for k, v in tensors.items() if k.startswith("shared.")}}
        return cls(rows, shared, previous)

    @classmethod
    def from_calls(cls, calls: list[dict[str, Any]]) -> "TrajectoryDataset":
        """Split recorded keyword-argument dicts into per-sample rows (batch = leading size of the first tensor)."""
        if not calls:
            raise ConfigError("at least one recorded denoiser call", "none",
                              "The sampling function must call the denoiser it is given.")
        rows: dict[str, list[torch.Tensor]] = {}
        shared: dict[str, Any] = {}
        previous: list[torch.Tensor] = []
        linked = all(_GENERATION in call for call in calls)
        last_row_of: dict[tuple, tuple[int, int]] = {}   # (generation, branch) -> (first row, batch) of last call
        offset = 0
        for call in calls:
            arguments = {k: v for k, v in call.items() if k not in (_GENERATION, _BRANCH)}
            batch = next(v.shape[0] for v in arguments.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
            for name, value in arguments.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                    rows.setdefault(name, []).append(value.detach().cpu())
                else:
                    shared.setdefault(name, value)
            if linked:
                key = (call[_GENERATION], call[_BRANCH])
                before = last_row_of.get(key)
                start = before[0] if before is not None and before[1] == batch else None
                previous.append(torch.arange(start, start + batch) if start is not None
                                else torch.full((batch,), -1, dtype=torch.long))
                last_row_of[key] = (offset, batch)
            offset += batch
        return cls({k: torch.cat(v) for k, v in rows.items()}, shared, torch.cat(previous) if linked else None)


class _RecordingDenoiser(SamplerHooks):
    """Calls the model (forced dense) and keeps each call's arguments by parameter name; as sampler hooks it also
    notes each call's generation and guidance branch, which links every row to its previous step."""

    def __init__(self, model: nn.Module):
        import inspect
        self.model = model
        self.signature = inspect.signature(model.forward)
        self.calls: list[dict[str, Any]] = []
        self.generation = 0
        self.current_branch: str | None = None
        self.hooked = False

    def start_generation(self) -> None:
        self.generation += 1
        self.hooked = True

    @contextlib.contextmanager
    def branch(self, name, step):
        self.current_branch = name
        try:
            yield
        finally:
            self.current_branch = None

    def __call__(self, *args, **kwargs):
        bound = self.signature.bind(*args, **kwargs).arguments
        call = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in bound.items()}
        if self.hooked:
            call[_GENERATION], call[_BRANCH] = self.generation, self.current_branch
        self.calls.append(call)
        with force(self.model, skip=False, width=1.0):
            return self.model(*args, **kwargs)

    def parameters(self):  # lets samplers find the model's device and dtype
        return self.model.parameters()


def record_trajectories(model: nn.Module, run_sampler: Callable[[Callable], Any]) -> TrajectoryDataset:
    """Run ``run_sampler(denoiser)`` with a recording dense denoiser; return the recorded inputs per sample.

    Example (class-conditional DiT with the project's sampler)::

        data = record_trajectories(model, lambda d: sample(d, scheduler, labels, config, seed=0, hooks=d))

    Passing the recorder as ``hooks`` too links each row to its previous step (needed by
    ``train_routers(..., cache_aware=True)``).
    """
    recorder = _RecordingDenoiser(model)
    with torch.no_grad():
        run_sampler(recorder)
    return TrajectoryDataset.from_calls(recorder.calls)


def record_class_conditional_trajectories(model: nn.Module, scheduler, sampling_config, *, samples_per_class: int,
                                          seed: int = 0, cfg: str = "batch", batch_size: int = 64) -> TrajectoryDataset:
    """Trajectories of ``samples_per_class`` generations per class with the project's sampler (CFG included,
    so the unconditional branch is in the data too)."""
    labels = [c for c in range(sampling_config.num_classes) for _ in range(samples_per_class)]
    calls: list[dict[str, Any]] = []
    recorder = _RecordingDenoiser(model)
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            chunk = labels[start:start + batch_size]
            sample(recorder, scheduler, chunk, sampling_config, seeds=[seed * 100003 + start + i for i in range(len(chunk))],
                   cfg=cfg, hooks=recorder)
    calls.extend(recorder.calls)
    return TrajectoryDataset.from_calls(calls)

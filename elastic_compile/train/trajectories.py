"""Training inputs for routers: the dense model's own sampling trajectories, recorded per sample.

Data-free router training (the default for the reference model) needs realistic noisy inputs x_t with their
timesteps and conditioning. ``record_trajectories`` runs any sampling loop with a recording denoiser (the
elastic model forced dense) and keeps every call's keyword arguments split into per-sample rows, so training
can draw mini-batches that mix steps, classes and guidance branches.

When the sampler drives the recorder's hooks too (``hooks=recorder``), every row also knows the row of the same
sample at the previous step of its generation and branch (``TrajectoryDataset.previous``): what cache-aware
router training needs to reproduce the feature cache's "reuse the last step's block update".

For models whose rows do not fit in memory, ``out=DIR`` records into a sharded store on disk instead
(train/store.py), rank-parallel under torch.distributed.
"""
from __future__ import annotations

import contextlib
import inspect
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
#: Separates an argument's name from a key of its dict value (``added_cond_kwargs::resolution``): dict arguments
#: holding tensors are recorded key by key, so their batched tensors become rows like any other argument.
NESTED = "::"


def flatten_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """Dict arguments that hold tensors spread into one entry per key (see :data:`NESTED`)."""
    flat: dict[str, Any] = {}
    for name, value in arguments.items():
        if isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values()):
            flat.update({f"{name}{NESTED}{key}": item for key, item in value.items()})
        else:
            flat[name] = value
    return flat


def nest_arguments(flat: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`flatten_arguments`: the keyword arguments a model call takes."""
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        outer, separator, inner = name.partition(NESTED)
        if separator:
            nested.setdefault(outer, {})[inner] = value
        else:
            nested[name] = value
    return nested


def check_constants(constants: dict[str, Any]) -> None:
    """Shared non-tensor arguments must be plain JSON values (what a dataset file can hold without code)."""
    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return isinstance(value, (type(None), bool, int, float, str))
    wrong = sorted(k for k, v in constants.items() if not plain(v))
    if wrong:
        raise ConfigError("shared arguments that are tensors or plain values (None, bool, numbers, strings, and "
                          "lists or dicts of them)", f"other values in {wrong}", "Pass such arguments only.")


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
        return nest_arguments({**self.shared, **{k: v.index_select(0, indices) for k, v in self.rows.items()}})

    def to(self, device) -> "TrajectoryDataset":
        return TrajectoryDataset({k: v.to(device) for k, v in self.rows.items()}, self.shared, self.previous)

    def save(self, path: str | os.PathLike) -> None:
        """Write the dataset as one safetensors file (what ``elastic-compile train --data`` reads): rows and
        tensor arguments as tensors, the other shared arguments as JSON in its metadata."""
        from safetensors.torch import save_file

        constants = {k: v for k, v in self.shared.items() if not isinstance(v, torch.Tensor)}
        check_constants(constants)
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
        splitter = RowSplitter()
        rows: dict[str, list[torch.Tensor]] = {}
        previous: list[torch.Tensor] = []
        for call in calls:
            call_rows, links = splitter.split(call)
            for name, value in call_rows.items():
                rows.setdefault(name, []).append(value)
            previous.append(links)
        return cls({k: torch.cat(v) for k, v in rows.items()}, splitter.shared,
                   torch.cat(previous) if splitter.linked else None)


class RowSplitter:
    """Splits recorded calls into per-sample rows one call at a time (what both the in-memory dataset and the
    on-disk store are built from): ``split(call) -> (rows, previous)``, ``previous`` being each row's row one
    step earlier (counted from the first row split, -1 at a first step). ``shared`` keeps the first value of
    each argument without a batch dimension; ``linked`` is False once a call came without sampler hooks."""

    def __init__(self):
        self.shared: dict[str, Any] = {}
        self.linked = True
        self.offset = 0
        self._last_row_of: dict[tuple, tuple[int, int]] = {}   # (generation, branch) -> (first row, batch)

    def split(self, call: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        arguments = flatten_arguments({k: v for k, v in call.items() if k not in (_GENERATION, _BRANCH)})
        batch = next(v.shape[0] for v in arguments.values() if isinstance(v, torch.Tensor) and v.ndim > 0)
        rows = {}
        for name, value in arguments.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                rows[name] = value.detach().cpu()
            else:
                self.shared.setdefault(name, value)
        self.linked = self.linked and _GENERATION in call
        previous = torch.full((batch,), -1, dtype=torch.long)
        if _GENERATION in call:
            key = (call[_GENERATION], call[_BRANCH])
            before = self._last_row_of.get(key)
            if before is not None and before[1] == batch:
                previous = torch.arange(before[0], before[0] + batch)
            self._last_row_of[key] = (self.offset, batch)
        self.offset += batch
        return rows, previous


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _detached(v) for k, v in value.items()}
    return value


class _RecordingDenoiser(SamplerHooks):
    """Calls the model (forced dense) and keeps each call's arguments by parameter name; as sampler hooks it also
    notes each call's generation and guidance branch, which links every row to its previous step."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.signature = inspect.signature(model.forward)
        self.calls: list[dict[str, Any]] = []
        self.generation = 0
        self.current_branch: str | None = None
        self.hooked = False
        self.sink: Callable | None = None   # recording to a store: each call goes there with its output, not to calls

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

    def arguments_of(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """One call's arguments by parameter name (``**kwargs`` spread out), tensors detached and cloned, with
        the generation and branch the call belongs to when the recorder is driven as sampler hooks."""
        bound = self.signature.bind(*args, **kwargs)
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = self.signature.parameters[name].kind
            if kind is inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            elif kind is inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise ConfigError("a denoiser whose arguments all have names", f"*{name} given {len(value)} "
                                      "values", "Call the denoiser with named arguments.")
            else:
                named[name] = value
        call = {k: _detached(v) for k, v in named.items()}
        if self.hooked:
            call[_GENERATION], call[_BRANCH] = self.generation, self.current_branch
        return call

    def keep(self, call: dict[str, Any], output) -> None:
        """Hand a recorded call (and the dense output it gave) to the store, or keep it in memory."""
        if self.sink is not None:
            self.sink(call, output)
        else:
            self.calls.append(call)

    def __call__(self, *args, **kwargs):
        call = self.arguments_of(args, kwargs)
        with force(self.model, skip=False, width=1.0):
            output = self.model(*args, **kwargs)
        self.keep(call, output)
        return output

    def parameters(self):  # lets samplers find the model's device and dtype
        return self.model.parameters()


def record_trajectories(model: nn.Module, run_sampler: Callable[[Callable], Any], *,
                        out: str | os.PathLike | None = None, shard_mb: float = 256.0):
    """Run ``run_sampler(denoiser)`` with a recording dense denoiser; return the recorded inputs per sample.

    Example (class-conditional DiT with the project's sampler)::

        data = record_trajectories(model, lambda d: sample(d, scheduler, labels, config, seed=0, hooks=d))

    Passing the recorder as ``hooks`` too links each row to its previous step (needed by
    ``train_routers(..., cache_aware=True)``). With ``out``, rows (and the dense outputs) go to a sharded store
    in that directory instead of memory and a :class:`~elastic_compile.train.store.TrajectoryStore` is returned
    (train/store.py); under torch.distributed each rank runs ``run_sampler`` on its own share.
    """
    recorder = _RecordingDenoiser(model)
    if out is not None:
        from .store import record_to_store
        return record_to_store(recorder, run_sampler, out, shard_mb)
    with torch.no_grad():
        run_sampler(recorder)
    return TrajectoryDataset.from_calls(recorder.calls)


def record_class_conditional_trajectories(model: nn.Module, scheduler, sampling_config, *, samples_per_class: int,
                                          seed: int = 0, cfg: str = "batch", batch_size: int = 64,
                                          out: str | os.PathLike | None = None, shard_mb: float = 256.0):
    """Trajectories of ``samples_per_class`` generations per class with the project's sampler (CFG included,
    so the unconditional branch is in the data too). With ``out``: a sharded store (see
    :func:`record_trajectories`); under torch.distributed rank r records every world-th chunk of ``batch_size``
    generations, with the noise seeds a single process would use."""
    labels = [c for c in range(sampling_config.num_classes) for _ in range(samples_per_class)]
    recorder = _RecordingDenoiser(model)
    rank, world = 0, 1
    if out is not None:
        from .store import _rank_world
        rank, world = _rank_world()

    def run(denoiser):
        for chunk_index, start in enumerate(range(0, len(labels), batch_size)):
            if chunk_index % world != rank:
                continue
            chunk = labels[start:start + batch_size]
            sample(denoiser, scheduler, chunk, sampling_config,
                   seeds=[seed * 100003 + start + i for i in range(len(chunk))], cfg=cfg, hooks=denoiser)
    if out is not None:
        from .store import record_to_store
        return record_to_store(recorder, run, out, shard_mb)
    with torch.no_grad():
        run(recorder)
    return TrajectoryDataset.from_calls(recorder.calls)

"""Resumable training runs: everything a run needs to continue exactly where it stopped, written atomically.

A long router-training run on a cluster gets pre-empted. ``ec.save`` checkpoints (``step-N``/``final``) hold the
routers a user serves; they cannot continue a run, because Adam's moments, the LR schedule's position, the data
sampler's and the stand-in sampler's random states and the logged history are not in them. This module writes
that state, every ``checkpoint_every`` steps, to ``<checkpoint_dir>/resume-<objective>.safetensors``: the trainable
parameters (routers; the base too when it trains), the optimizer's tensors, every rank's random generator states
as tensors, and the rest (step, optimizer hyper-parameters, scheduler state, history, the run's settings) as JSON
in the file's metadata. Nothing in it can run code (no pickle).

The file is written to a temporary name, flushed to disk and then renamed over the previous one
(``os.replace``): a run killed while writing leaves the last complete checkpoint in place. Resuming a run with
the same settings (checked) restores all of it, so a run killed at step k and resumed ends bitwise-equal to the
run that was never interrupted. Under torch.distributed each rank's generators are gathered to rank 0, which
writes the file; every rank reads it back and takes its own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn

from ..errors import ConfigError
from ..state import state_of

RESUME_FILE = "resume-{objective}.safetensors"   # one per objective: a CLI run's step and rollout stages
FORMAT = "elastic_compile.train-state/1"
_replace = os.replace   # the publishing rename (tests make it fail to simulate a kill between write and rename)


def resume_path(directory: str | os.PathLike, objective: str) -> Path:
    """Where the state of a run with ``objective`` ("step" or "rollout") is kept in ``directory``."""
    return Path(directory) / RESUME_FILE.format(objective=objective)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _json_safe(value):
    if isinstance(value, tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        raise TypeError("tensors belong in the tensor part")
    return value


class RunState:
    """Saves and restores one run's state in ``directory`` (see the module doc).

    ``generators``: the run's named CPU generators (per rank); ``settings``: what must match for a resume to be
    exact (a mismatch is a ConfigError, not a silently different run); ``train_base``: save base weights too."""

    def __init__(self, directory: str | os.PathLike, model: nn.Module, optimizer, scheduler,
                 generators: dict[str, torch.Generator], settings: dict, train_base: bool = False):
        self.path = resume_path(directory, settings["objective"])
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.generators = generators
        self.settings = _json_safe(settings)
        self.train_base = train_base
        self.extra: dict = {}

    # ----------------------------------------------------------------------------------------------- tensors
    def _parameters(self) -> dict[str, torch.Tensor]:
        state = state_of(self.model)
        tensors = {f"router.{i}.{k}": v for i, r in state.routers.items() for k, v in r.state_dict().items()}
        if self.train_base:
            router_ids = {id(p) for r in state.routers.values() for p in r.parameters()}
            tensors.update({f"base.{n}": p for n, p in self.model.named_parameters() if id(p) not in router_ids})
        return tensors

    def _random_states(self) -> dict[str, torch.Tensor]:
        rank, world = _rank_world()
        local = {"torch": torch.get_rng_state(), **{n: g.get_state() for n, g in self.generators.items()}}
        if world == 1:
            return {f"rng.{name}.0": s for name, s in local.items()}
        gathered = {}
        for name, mine in local.items():
            parts = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(parts, mine)
            gathered.update({f"rng.{name}.{r}": p for r, p in enumerate(parts)})
        return gathered

    def save(self, step: int, history: list[dict], extra: dict | None = None) -> Path | None:
        """Write the state after ``step`` (every rank must call it; rank 0 writes); returns the path on rank 0."""
        from safetensors.torch import save_file

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self._parameters().items()}
        tensors.update(self._random_states())
        optimizer = self.optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for index, entry in optimizer["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{index}.{key}"] = value.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        if _rank_world()[0] != 0:
            return None
        meta = {"format": FORMAT, "step": step, "settings": self.settings, "history": history,
                "extra": _json_safe(extra or {}), "optimizer_groups": _json_safe(optimizer["param_groups"]),
                "optimizer_scalars": _json_safe(scalars), "scheduler": _json_safe(self.scheduler.state_dict()),
                "world_size": _rank_world()[1]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _replace(tmp, self.path)
        return self.path

    # ----------------------------------------------------------------------------------------------- restore
    def restore(self) -> tuple[int, list[dict], dict] | None:
        """Load the saved state into the model, optimizer, scheduler and generators: ``(step, history, extra)``,
        or None when there is no checkpoint yet (a fresh run)."""
        if not self.path.exists():
            return None
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as handle:
                meta = json.loads((handle.metadata() or {})["state"])
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"a training checkpoint ({self.path.name}) at {self.path}", f"{type(exc).__name__}: {exc}",
                              "Delete it to start the run over, or restore it from a backup.") from exc
        if meta.get("format") != FORMAT:
            raise ConfigError(f"a checkpoint of format {FORMAT}", repr(meta.get("format")), "Start the run over.")
        rank, world = _rank_world()
        differing = {k: (meta["settings"].get(k), v) for k, v in self.settings.items() if meta["settings"].get(k) != v}
        if meta["world_size"] != world:
            differing["world_size"] = (meta["world_size"], world)
        if differing:
            found = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differing.items()))
            raise ConfigError(f"a resumed run with the settings of the checkpoint at {self.path}", found,
                              "Resume with the same options and process count, or use another output directory.")
        parameters = self._parameters()
        if set(parameters) != {k for k in tensors if k.startswith(("router.", "base."))}:
            raise ConfigError("a checkpoint of this model's routers", f"parameters of another model in {self.path}",
                              "Resume with the same model and routers, or use another output directory.")
        with torch.no_grad():
            for key, value in parameters.items():
                value.copy_(tensors[key])
        optimizer = {"param_groups": meta["optimizer_groups"], "state": {}}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                optimizer["state"].setdefault(int(index), {})[name] = value
        for index, values in meta["optimizer_scalars"].items():
            optimizer["state"].setdefault(int(index), {}).update(values)
        self.optimizer.load_state_dict(optimizer)
        self.scheduler.load_state_dict(meta["scheduler"])
        torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        for name, generator in self.generators.items():
            generator.set_state(tensors[f"rng.{name}.{rank}"])
        self.extra = meta["extra"]
        return meta["step"], meta["history"], meta["extra"]

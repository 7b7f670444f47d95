"""Trajectory store: recorded training inputs on disk, sharded, streamed by training.

The in-memory :class:`~elastic_compile.train.TrajectoryDataset` fits a small model; a real DiT's rows do not
(a FLUX row at 4096 tokens is tens of MB: a thousand prompts x 28 steps is most of a terabyte). Recording with
``out=DIR`` writes the same rows as safetensors shards instead (``part-<rank>-<shard>.safetensors``, each holding
whole denoiser calls, flushed once ``shard_mb`` accumulate), together with the dense model's output per row (the
distillation target, so training needs no teacher forward) and each row's step link. Under torch.distributed every
rank records its own share into its own part; rank 0 then writes ``index.json`` (atomically, last: a store
without an index is incomplete).

:class:`TrajectoryStore` reads it back with the interface training uses (``len``, ``batch(rows)``, ``previous``):
rows are sliced out of memory-mapped shards on demand, so memory holds one batch, not the dataset. What it does
keep per row is the step link (8 bytes) and, in the sampler, one epoch's permutation (8 bytes).

:class:`EpochSampler` draws global batches from a seeded permutation of all rows per epoch, each rank taking its
contiguous share: within an epoch no row is seen twice, on any rank. It is stateless in the step number, so a
resumed run continues exactly. (The in-memory dataset keeps its sampling with replacement, so the same seed
gives another row order there.)
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import distributed as dist

from ..errors import ConfigError
from ..sampling import denoiser_output
from .trajectories import TEACHER_KEY, RowSplitter, check_constants, nest_arguments

STORE_FORMAT = "elastic_compile.trajectory-store/1"
INDEX = "index.json"
_OPEN_SHARDS = 32   # memory-mapped shard handles kept open at once


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class StoreWriter:
    """One rank's part of a store: ``add(call, output)`` per recorded denoiser call, then ``close()``."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0, shard_mb: float = 256.0):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank, self.limit = rank, int(shard_mb * 2 ** 20)
        self.splitter = RowSplitter()
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.links: list[torch.Tensor] = []
        self.buffered_bytes = 0
        self.shards: list[dict] = []
        self.keys: dict[str, list] = {}

    def add(self, call: dict[str, Any], output) -> None:
        rows, previous = self.splitter.split(call)
        target = denoiser_output(output).detach().cpu()
        if target.shape[0] != previous.shape[0]:
            raise ConfigError("a denoiser output with one row per input row", f"{tuple(target.shape)} for a batch of "
                              f"{previous.shape[0]}", "Record a denoiser that returns per-sample predictions.")
        rows[TEACHER_KEY] = target
        for name, value in rows.items():
            self.keys.setdefault(name, [list(value.shape[1:]), str(value.dtype)])
            self.buffer.setdefault(name, []).append(value)
            self.buffered_bytes += value.numel() * value.element_size()
        self.links.append(previous)
        if self.buffered_bytes >= self.limit:
            self._flush()

    def _flush(self) -> None:
        if not self.links:
            return
        from safetensors.torch import save_file

        name = f"part-{self.rank:03d}-{len(self.shards):05d}.safetensors"
        tensors = {f"rows.{k}": torch.cat(v).contiguous() for k, v in self.buffer.items()}
        tensors["previous"] = torch.cat(self.links)
        save_file(tensors, str(self.directory / name))
        self.shards.append({"file": name, "rows": int(tensors["previous"].shape[0])})
        self.buffer, self.links, self.buffered_bytes = {}, [], 0

    def close(self) -> None:
        """Write the last shard and this part's manifest (``part-<rank>.json``, shared tensors beside it)."""
        from safetensors.torch import save_file

        self._flush()
        if not self.shards:
            raise ConfigError("at least one recorded denoiser call per rank", f"none on rank {self.rank}",
                              "Give every rank a share of the prompts / classes to record.")
        shared = self.splitter.shared
        constants = {k: v for k, v in shared.items() if not isinstance(v, torch.Tensor)}
        check_constants(constants)
        tensors = {k: v.contiguous() for k, v in shared.items() if isinstance(v, torch.Tensor)}
        shared_file = None
        if tensors:
            shared_file = f"part-{self.rank:03d}-shared.safetensors"
            save_file(tensors, str(self.directory / shared_file))
        manifest = {"rows": self.splitter.offset, "linked": self.splitter.linked, "shards": self.shards,
                    "keys": self.keys, "constants": constants, "shared": shared_file}
        (self.directory / f"part-{self.rank:03d}.json").write_text(json.dumps(manifest))


def finish_store(directory: str | os.PathLike, world: int) -> None:
    """Merge every rank's part manifest into ``index.json`` (rank 0, after all parts are written)."""
    directory = Path(directory)
    parts = [json.loads((directory / f"part-{r:03d}.json").read_text()) for r in range(world)]
    if any(p["keys"] != parts[0]["keys"] for p in parts):
        raise ConfigError("every rank recording the same arguments", f"{[sorted(p['keys']) for p in parts]}",
                          "Record every share with the same sampler and model.")
    start = 0
    shards = []
    for part in parts:
        part_start = start
        for shard in part["shards"]:
            shards.append({**shard, "start": start, "part_start": part_start})
            start += shard["rows"]
    index = {"format": STORE_FORMAT, "rows": start, "linked": all(p["linked"] for p in parts), "shards": shards,
             "keys": parts[0]["keys"], "constants": parts[0]["constants"], "shared": parts[0]["shared"]}
    tmp = directory / f".{INDEX}.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, directory / INDEX)


class TrajectoryStore:
    """A recorded store opened for training (see the module doc): ``len``, ``batch(rows)``, ``previous``."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        try:
            index = json.loads((self.directory / INDEX).read_text())
            ok = index.get("format") == STORE_FORMAT
        except (OSError, ValueError) as exc:
            index, ok = {"format": f"unreadable ({type(exc).__name__})"}, False
        if not ok:
            raise ConfigError(f"a trajectory store (index.json of format {STORE_FORMAT}) in {self.directory}",
                              f"format {index.get('format')!r}",
                              "Record it with `elastic-compile record --out DIR` (an interrupted recording has no "
                              "index.json: record again).")
        self.index = index
        self.starts = torch.tensor([s["start"] for s in index["shards"]])
        self.shared: dict[str, Any] = dict(index["constants"])
        if index["shared"]:
            from safetensors.torch import load_file
            self.shared.update(load_file(str(self.directory / index["shared"])))
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self.previous = self._links() if index["linked"] else None

    def __len__(self) -> int:
        return int(self.index["rows"])

    @property
    def has_teacher(self) -> bool:
        return TEACHER_KEY in self.index["keys"]

    def _handle(self, shard: int):
        from safetensors import SafetensorError, safe_open

        if shard not in self._handles:
            if len(self._handles) >= _OPEN_SHARDS:
                self._handles.popitem(last=False)
            path = self.directory / self.index["shards"][shard]["file"]
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except (OSError, SafetensorError) as exc:
                raise ConfigError(f"the shard {path.name} of the store {self.directory}", f"{type(exc).__name__}: "
                                  f"{exc}", "Record the store again (a shard is missing or damaged).") from exc
        self._handles.move_to_end(shard)
        return self._handles[shard]

    def _links(self) -> torch.Tensor:
        """Every row's previous-step row as a global index (-1 at a first step), from each shard's part-local
        links (8 bytes per row, read once)."""
        links = []
        for i, shard in enumerate(self.index["shards"]):
            local = self._handle(i).get_tensor("previous")
            links.append(torch.where(local >= 0, local + shard["part_start"], local))
        return torch.cat(links)

    def batch(self, indices: torch.Tensor) -> dict[str, Any]:
        """Keyword arguments of one model call made of rows ``indices`` (read from the shards on demand),
        with the recorded dense outputs under ``TEACHER_KEY``."""
        indices = indices.reshape(-1).cpu()
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(self)):
            raise ConfigError(f"row indices in [0, {len(self)})", f"{int(indices.min())}..{int(indices.max())}",
                              "Index rows of this store only.")
        shards = torch.searchsorted(self.starts, indices, right=True) - 1
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in self.index["keys"]}
        for row, shard in zip(indices.tolist(), shards.tolist()):
            handle, local = self._handle(shard), row - self.index["shards"][shard]["start"]
            for key in rows:
                rows[key].append(handle.get_slice(f"rows.{key}")[local:local + 1])
        empty = {k: torch.empty((0, *shape), dtype=getattr(torch, dtype.split(".")[-1]))
                 for k, (shape, dtype) in self.index["keys"].items()}
        return nest_arguments({**self.shared, **{k: torch.cat(v) if v else empty[k] for k, v in rows.items()}})


class EpochSampler:
    """Global batch ``b`` (0-based) of a seeded stream of per-epoch permutations of ``n`` rows; ``share(b, rank,
    world)`` is this rank's contiguous part of it (disjoint across ranks; no row twice within an epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch: tuple[int, torch.Tensor] | None = None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if self._epoch is None or self._epoch[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch = (epoch, torch.randperm(self.n, generator=generator))
        return self._epoch[1]

    def rows(self, b: int) -> torch.Tensor:
        position, parts = b * self.batch_size, []
        remaining = self.batch_size
        while remaining:
            epoch, offset = divmod(position, self.n)
            take = min(remaining, self.n - offset)
            parts.append(self._permutation(epoch)[offset:offset + take])
            position, remaining = position + take, remaining - take
        return torch.cat(parts)

    def share(self, b: int, rank: int, world: int) -> torch.Tensor:
        size = self.batch_size // world
        return self.rows(b)[rank * size:(rank + 1) * size]


def record_to_store(recorder, run, directory: str | os.PathLike, shard_mb: float = 256.0) -> TrajectoryStore:
    """Run ``run(recorder)`` (this rank's share) with the recorder writing into ``directory``; every rank must
    call it. Returns the finished store (opened once rank 0 has written the index)."""
    rank, world = _rank_world()
    writer = StoreWriter(directory, rank, shard_mb)
    recorder.sink = writer.add
    with torch.no_grad():
        run(recorder)
    writer.close()
    if world > 1:
        dist.barrier()
    if rank == 0:
        finish_store(directory, world)
    if world > 1:
        dist.barrier()
    return TrajectoryStore(directory)

"""``record_pipeline_trajectories(pipe, calls)``: router training data from a diffusers pipeline's own denoising.

Why: a pipeline user has prompts, not the transformer's inputs; the pipeline builds them (text embeddings, ids,
``added_cond_kwargs``, guidance) and runs the sampler. Here the pipeline runs unchanged, once per call in
``calls``, with ``pipe.<component>`` (an elastic model) forced dense, and hooks on that model record every
denoiser call's arguments by name, split into per-sample rows as :func:`~.trajectories.record_trajectories`
does, together with the dense output (what distillation matches). Each pipeline call is one generation; the
guidance branch of a call is the name the pipeline gives it through diffusers' cache protocol
(``transformer.cache_context("cond")``, Flux true CFG), or one unnamed branch when the pipeline batches
guidance (DiT, PixArt): so every row links to the same sample's row one step earlier, as cache-aware training
needs. With ``out=DIR`` rows stream to a sharded store; under torch.distributed rank r runs calls r, r+world, ...
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..cache.diffusers_protocol import listening_to_cache_context
from ..errors import ConfigError
from ..state import force, state_of
from .trajectories import TrajectoryDataset, _RecordingDenoiser


def record_pipeline_trajectories(pipe, calls: Sequence[dict[str, Any]], *, component: str = "transformer",
                                 out: str | os.PathLike | None = None, shard_mb: float = 256.0):
    """Run ``pipe(**call)`` for every call with ``pipe.<component>`` forced dense and return what it was fed.

    Example::

        pipe.transformer = ec.transform(pipe.transformer, example_inputs=ec.capture_inputs(pipe, prompt="a cat"))
        data = record_pipeline_trajectories(pipe, [{"prompt": p, "generator": torch.Generator().manual_seed(i)}
                                                   for i, p in enumerate(prompts)])
        ec.train_routers(pipe.transformer, data, budget=0.5)

    Returns a :class:`~.trajectories.TrajectoryDataset` (rows linked step to step), or with ``out`` a
    :class:`~.store.TrajectoryStore`. The pipeline's outputs are discarded; its model is left as it was.
    """
    model = getattr(pipe, component, None)
    if not isinstance(model, nn.Module):
        raise ConfigError(f"a pipeline with a torch module as .{component}", f"{type(model).__name__}",
                          "Pass a diffusers pipeline (or name its denoiser with component=..., e.g. 'unet').")
    state_of(model)   # NotElasticError for a plain model: recording forces the elastic model dense
    calls = list(calls)
    if not calls or not all(isinstance(call, dict) for call in calls):
        raise ConfigError("a non-empty list of keyword-argument dicts, one per pipeline call",
                          f"{len(calls)} items of types {sorted({type(c).__name__ for c in calls})}",
                          "Pass e.g. [{'prompt': 'a cat'}, ...].")
    recorder = _RecordingDenoiser(model)

    def run(_recorder, share: Sequence[dict[str, Any]]):
        with force(model, skip=False, width=1.0), _recording(model, recorder) as recorded:
            for call in share:
                recorder.start_generation()
                pipe(**call)
        if share and not recorded:
            raise ConfigError(f"pipeline calls that call pipe.{component}", "calls that never did",
                              "Pass arguments that run at least one denoising step.")

    if out is not None:
        from .store import _rank_world, record_to_store
        rank, world = _rank_world()
        return record_to_store(recorder, lambda r: run(r, calls[rank::world]), out, shard_mb)
    with torch.no_grad():
        run(recorder, calls)
    return TrajectoryDataset.from_calls(recorder.calls)


@contextlib.contextmanager
def _recording(model: nn.Module, recorder: _RecordingDenoiser):
    """Hooks that hand every call of ``model`` to ``recorder`` (arguments before, dense output after) and keep
    its branch name current from the cache protocol."""
    pending: list[dict[str, Any]] = []
    recorded: list[int] = []

    def before(_module, args, kwargs):
        pending.append(recorder.arguments_of(args, kwargs))

    def after(_module, _args, _kwargs, output):
        recorder.keep(pending.pop(), output)
        recorded.append(1)

    def branch(name):
        recorder.current_branch = name

    handles = [model.register_forward_pre_hook(before, with_kwargs=True),
               model.register_forward_hook(after, with_kwargs=True)]
    recorder.hooked = True
    try:
        with listening_to_cache_context(model, branch):
            yield recorded
    finally:
        for handle in handles:
            handle.remove()

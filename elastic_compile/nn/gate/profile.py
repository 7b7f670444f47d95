"""FLOP profiling, the gate's mode while :func:`flop_table` measures an elastic model's forward at every width
bucket without computing anything (or, for a forward that reads tensor values, on its real inputs).

The model runs under ``FakeTensorMode`` (shapes only) and ``analysis.flop_counter`` (``FlopCounterMode`` that
also counts CPU attention), once per bucket with ``force`` pinning every decision; each gate (:func:`forward`)
runs its block's plan for the first sample under its own counter and reports the block's FLOPs, without touching
the feature cache or the decision records. The counts are what a real run reports, for any input shapes. One
table per input signature is cached on the model's state (``stats`` and the training budget read it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from ...analysis.flop_counter import flop_counter
from ...cache.diffusers_protocol import profiling_hooks
from ...errors import FlopProfileError
from ...state import ElasticState, ForcedPlan, TensorMeta, describe_inputs, strong_inputs


@dataclass
class FlopTable:
    """``dense_total``: FLOPs of the dense forward (whole batch). ``block_calls``: per block call in run order,
    ``(block index, FLOPs at each bucket)`` for the whole batch of that call."""

    dense_total: int
    block_calls: list[tuple[int, list[int]]]

    @property
    def non_block(self) -> int:
        return self.dense_total - sum(flops[-1] for _, flops in self.block_calls)


def forward(gate, args: tuple, kwargs: dict):
    """The block's output under the pinned plan, its FLOPs appended to ``state.profile_sink``."""
    arguments = gate.bind(args, kwargs)
    run, bucket, *_ = gate.decide(arguments, gate.stream_batch(arguments))
    with flop_counter() as counter:
        out = gate.run_plan((run[0], bucket[0]), args, kwargs, arguments)
    gate.state.profile_sink.append((gate.index, counter.get_total_flops()))
    return out


def signature_key(inputs) -> tuple:
    leaves, spec = pytree.tree_flatten(inputs)
    return str(spec), tuple((l.shape, l.dtype) if isinstance(l, TensorMeta) else repr(l)[:200] for l in leaves)


def flop_table(model: nn.Module, state: ElasticState, inputs) -> FlopTable:
    """The cached FlopTable of an input signature (``inputs`` from ``describe_inputs``), profiled on first use."""
    key = signature_key(inputs)
    if key not in state.flop_tables:
        state.flop_tables[key] = profile_flops(model, state, inputs)
    return state.flop_tables[key]


def profile_flops(model: nn.Module, state: ElasticState, inputs) -> FlopTable:
    """Measure a FlopTable for the (meta-described) ``inputs`` = ``(args, kwargs)`` of a forward: on shape-only
    tensors, else (a forward that reads tensor values: mask lengths by ``.item()`` / ``.tolist()``) on the real
    inputs of the last forward when they have this signature and are still alive."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            args, kwargs = pytree.tree_map(
                lambda x: torch.zeros(x.shape, dtype=x.dtype, device=x.device) if isinstance(x, TensorMeta) else x,
                inputs)
            return _profile(model, state, args, kwargs, shape_only=True)
    except Exception as exc:
        fake_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    real = strong_inputs(state.last_tensors) if state.last_tensors is not None else None
    if real is None or signature_key(describe_inputs(*real)) != signature_key(inputs):
        raise FlopProfileError(
            "a forward that runs on shape-only (fake) tensors, or the real inputs of the last forward",
            f"{fake_error}; the last forward's inputs are {'gone' if real is None else 'of another signature'}",
            "The model reads tensor values: keep the inputs of the forward alive until stats() has run.")
    try:
        return _profile(model, state, *real, shape_only=False)
    except Exception as exc:
        raise FlopProfileError(
            "a forward that runs under FLOP counting", f"{fake_error}; on real tensors: {type(exc).__name__}: {exc}",
            "Report the model.") from exc


def _profile(model: nn.Module, state: ElasticState, args, kwargs, shape_only: bool) -> FlopTable:
    buckets = state.config.width_buckets
    per_bucket_calls: list[list[tuple[int, int]]] = []
    dense_total = 0
    previous = state.forced
    state.profiling = True
    try:
        for width in buckets:
            state.forced = ForcedPlan(skip=False, width=width)
            state.profile_sink = []
            # diffusers hooks (first-block cache, layerwise casting, group offloading) as they can run here
            with profiling_hooks(model, shape_only), flop_counter() as counter, torch.no_grad():
                model(*args, **kwargs)
            per_bucket_calls.append(state.profile_sink)
            dense_total = counter.get_total_flops()
    finally:
        state.profiling = False
        state.profile_sink = None
        state.forced = previous
    calls = [(block, [per_bucket_calls[b][i][1] for b in range(len(buckets))])
             for i, (block, _) in enumerate(per_bucket_calls[-1])]
    return FlopTable(dense_total, calls)

"""The functions that get exported: one block at one width bucket, and one router, over flat tensor inputs.

:class:`BlockProgram` is an ``nn.Module`` whose ``forward(*tensors)`` rebuilds the block's arguments from a
:class:`~elastic_compile.artifact.layout.CallLayout`, pins the block's :class:`~elastic_compile.nn.width.WidthControl` to one bucket
and calls the block's *original* forward (the code under its gate), returning the output's tensor leaves.
Guarantee: in eager mode it returns exactly what the PyTorch elastic model computes for that block at that
bucket (it runs the same modules with the same sliced weights); torch.export captures that computation with
static shapes. After the block's outputs it returns, for the outputs listed in ``pooled``, their router
summaries (:func:`token_summary`): what the next block's router reads first (see ``serve/summaries.py``); and,
with a ``lookahead``, last, the next block's router logits (see :mod:`.lookahead`).
"""
from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..artifact.layout import CallLayout, OutputLayout
from ..state import gate_of


class BlockProgram(nn.Module):
    """One block at one bucket (index into the config's buckets; the dense bucket runs unsliced)."""

    def __init__(self, block: nn.Module, bucket: int, dense_bucket: int, layout: CallLayout, outputs: OutputLayout,
                 pooled: Sequence[int] = (), lookahead: nn.Module | None = None):
        super().__init__()
        self.block = block
        self.bucket = None if bucket == dense_bucket else bucket
        self.layout = layout
        self.outputs = outputs
        self.pooled = list(pooled)
        self.lookahead = lookahead  # .lookahead.LookaheadProgram: the next block's router, last output

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        gate = gate_of(self.block)
        args, kwargs = self.layout.rebuild(tensors)
        previous = gate.control.bucket
        gate.control.bucket = self.bucket
        try:
            out = gate.torch_forward(*args, **kwargs)
        finally:
            gate.control.bucket = previous
        outputs = self.outputs.tensors_of(out)
        means = {k: token_mean(outputs[k]) for k in self.pooled}  # shared by the summaries and the lookahead
        extra = () if self.lookahead is None else (self.lookahead(tensors, outputs, means),)
        return tuple(outputs) + tuple(normalized_summary(means[k]) for k in self.pooled) + extra


#: LayerNorm epsilon of router summaries; every Router normalises its features with nn.LayerNorm's default.
SUMMARY_EPS = 1e-5


def token_mean(stream: torch.Tensor) -> torch.Tensor:
    """``(B, ..., C) -> (B, C)``: the float32 mean over the token dimensions, as a product with a constant ``1/T``
    row: one MatMul in ONNX, which ONNX Runtime runs faster than a ReduceMean over the token axis."""
    flat = stream.reshape(stream.shape[0], -1, stream.shape[-1]).float()
    weights = torch.full((1, flat.shape[1]), 1.0 / flat.shape[1], dtype=torch.float32, device=stream.device)
    return torch.matmul(weights, flat).squeeze(1)


def token_summary(stream: torch.Tensor) -> torch.Tensor:
    """``(B, ..., C) -> (B, C)``: :func:`token_mean` layer-normalised without affine parameters (eps
    :data:`SUMMARY_EPS`) - a router's pooled feature right before its LayerNorm's affine step."""
    return normalized_summary(token_mean(stream))


def normalized_summary(mean: torch.Tensor) -> torch.Tensor:
    """A token mean ``(B, C)`` as :func:`token_summary` returns it."""
    return F.layer_norm(mean, mean.shape[-1:], eps=SUMMARY_EPS)


def pooled_outputs(outputs: Sequence[torch.Tensor], batch: int) -> list[int]:
    """Indices of the block outputs that are token streams ``(batch, tokens..., channels)`` of real floats:
    the ones whose token mean a graph also returns."""
    return [k for k, t in enumerate(outputs)
            if t.ndim >= 3 and t.shape[0] == batch and t.is_floating_point() and not t.is_complex()]


class RouterProgram(nn.Module):
    """A router as a function of its feature inputs (in the order of ``router.features``)."""

    def __init__(self, router: nn.Module):
        super().__init__()
        self.router = router
        self.names = [f.name for f in router.features]

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.router(dict(zip(self.names, tensors)))


@contextlib.contextmanager
def cast_module(module: nn.Module, dtype: torch.dtype):
    """Temporarily cast ``module``'s floating-point parameters and buffers to ``dtype``.

    Guarantee: on exit every parameter and buffer holds exactly its original tensor again (the original
    storage is kept aside, not re-cast), so the caller's model is unchanged bit for bit.
    """
    saved_params, saved_buffers = [], []
    try:
        for sub in module.modules():
            for name, param in sub._parameters.items():
                if param is not None and param.is_floating_point() and param.dtype != dtype:
                    saved_params.append((param, param.data))
                    param.data = param.data.to(dtype)
            for name, buffer in sub._buffers.items():
                if buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype:
                    saved_buffers.append((sub, name, buffer))
                    sub._buffers[name] = buffer.to(dtype)
        yield module
    finally:
        for param, data in saved_params:
            param.data = data
        for sub, name, buffer in saved_buffers:
            sub._buffers[name] = buffer


def cast_inputs(tensors, dtype: torch.dtype) -> list[torch.Tensor]:
    """Real floating-point tensors cast to ``dtype``; integer, boolean and complex tensors unchanged."""
    return [t.to(dtype) if t.is_floating_point() else t for t in tensors]

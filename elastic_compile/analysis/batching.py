"""Whether a block's call can be split into sub-batches by rows, checked on the recorded call.

The host gate runs samples that share a plan as one sub-batch, cutting every argument whose leading dimension is
the batch. That is only right when the block computes each row from that row alone. Some codebases hand blocks
inputs that are not batch-major: text flattened across the batch (``(1, B*L, D)`` with a list of per-sample
lengths, as in PixArt-alpha's and Open-Sora's own code). Cutting the image rows then pairs them with the whole
batch's text, which raises or, worse, computes something else (the first row often still lines up with the first
caption: only a later row shows it). The check runs the block on the first and on the last row alone (every
batch-major argument cut to that row, the rest passed unchanged, exactly as the gate would) and compares with those
rows of the whole-batch output; a block that fails never runs sub-batches (see :mod:`elastic_compile.nn.gate.host`).

Other codebases hand blocks no batch axis at all: packed token streams ``(tokens, hidden)`` (Cosmos3-Omni's
understanding and generation streams, a batch flattened to ``(B*L, D)``). Dim 0 then counts tokens, so a router
reading it as the batch decides per token, or fails on streams of different lengths. :func:`batch_axis_problem`
finds such blocks on the recorded call; they are routed once per call (:mod:`elastic_compile.nn.call_router`).
"""
from __future__ import annotations

import torch
from torch import nn

from ..batch import select_rows
from ..capture.treespec import flatten_output


def splits_by_rows(module: nn.Module, args: tuple, kwargs: dict, output, batch: int,
                   atol: float = 1e-4) -> tuple[bool, str]:
    """``(True, "")`` when the first and the last row, each run alone, reproduce their rows of the recorded
    output, else ``(False, why)``. With a batch of one nothing can be checked: ``(True, "")``."""
    if batch < 2:
        return True, ""
    expected, _ = flatten_output(output)
    for row in (0, batch - 1):
        why = _row_problem(module, args, kwargs, expected, batch, row, atol)
        if why:
            return False, why
    return True, ""


def batch_axis_problem(arguments: dict, streams: list[str]) -> str:
    """Why the block's hidden-state ``streams`` have no leading batch axis, or ``""`` when they have one.

    No batch axis: the streams disagree on their leading size (other than 1, which broadcasts), or every stream
    is 2-D: a block that mixes tokens holds its tokens on dim 0 then."""
    shapes = [tuple(arguments[n].shape) for n in streams
              if isinstance(arguments.get(n), torch.Tensor) and arguments[n].ndim > 0]
    if not shapes:
        return ""
    leading = sorted({s[0] for s in shapes} - {1})
    if len(leading) > 1:
        return f"streams of {' and '.join(map(str, leading))} rows"
    if all(len(s) == 2 for s in shapes):
        return "2-D (tokens, hidden) streams"
    return ""


def _row_problem(module, args, kwargs, expected: list, batch: int, row: int, atol: float) -> str:
    index = torch.tensor([row], dtype=torch.long)
    try:
        sub_args, sub_kwargs = select_rows((args, kwargs), index.to(_device(expected)), batch)
        with torch.no_grad():
            got, _ = flatten_output(module(*sub_args, **sub_kwargs))
    except Exception as exc:
        return f"row {row} alone raises {type(exc).__name__}"
    if len(got) != len(expected):
        return f"row {row} alone returns another output structure"
    for full, alone in zip(expected, got):
        if not isinstance(full, torch.Tensor):
            continue
        if not isinstance(alone, torch.Tensor) or full.ndim == 0 or full.shape[0] != batch:
            return "an output is not batch-major"
        if tuple(alone.shape) != (1, *full.shape[1:]):
            return f"row {row} alone returns shape {tuple(alone.shape)}"
        scale = max(1.0, float(full.abs().max())) if full.numel() else 1.0
        if alone.numel() and float((alone.float() - full[row:row + 1].float()).abs().max()) > atol * scale:
            return f"row {row} alone computes another result than in the batch"
    return ""


def _device(values) -> torch.device:
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))

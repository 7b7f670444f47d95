"""What runs a block inside an exported runtime: the graph of the block's current width bucket.

A :class:`BlockExecutor` replaces ``gate.original_forward``, so the block's gate keeps doing everything else
(router or ``force`` decisions, grouping samples by plan, skips and whatever ``skip_output`` applies, decision
records for ``stats``) exactly as on the PyTorch elastic model; only the block's own computation moves to
ONNX Runtime / TensorRT. The gate sets ``control.bucket`` before calling it, which selects the graph.

Static batch sizes: a (sub-)batch of ``n`` rows runs as chunks from :func:`plan_chunks`; a chunk smaller than
its graph's batch size is padded by repeating its last row, and padding rows are dropped from the outputs.
Rows never interact inside a transformer block, so padding cannot change the real rows (tested).

Graphs exported with ``pooled_outputs`` also return the router summaries of those outputs; the executor hands
them to the runtime's :class:`~.summaries.PooledSummaries` for the next router (older graphs without them work
as before). Graphs with a ``lookahead`` return the next block's router logits last; the executor hands them to
:class:`~.lookahead.LookaheadLogits` with the tensors they were computed from.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils import _pytree as pytree

from ..artifact.graphs import DTYPES, graph_inputs
from ..artifact.layout import CallLayout, OutputLayout
from ..errors import BucketNotExportedError, ConfigError, InputMismatchError
from .lookahead import LookaheadLogits
from .summaries import PooledSummaries
from .torch_threads import using_torch_threads


def plan_chunks(rows: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Split ``rows`` into ``(real rows, graph batch size)`` chunks: full chunks of the largest size, then the
    rest padded up to the smallest size that holds it. Every size used is in ``sizes``."""
    sizes = sorted(sizes)
    chunks = []
    while rows > 0:
        if rows >= sizes[-1]:
            chunks.append((sizes[-1], sizes[-1]))
            rows -= sizes[-1]
        else:
            chunks.append((rows, next(s for s in sizes if s >= rows)))
            rows = 0
    return chunks


def pad_rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` with its last row repeated until it has ``size`` rows."""
    missing = size - tensor.shape[0]
    if missing <= 0:
        return tensor
    return torch.cat([tensor, tensor[-1:].expand((missing,) + tuple(tensor.shape[1:]))])


OTHER_SHAPES = ("error", "torch")


class OtherShapes:
    """What a runtime does with a block call its static graphs were not exported for (another resolution or
    sequence length): "error" raises the layout's InputMismatchError; "torch" runs that call through the block's
    PyTorch weights (kept at load for this) and warns once per runtime, naming the block and the shapes, so a
    pipeline keeps working at a new resolution while the user learns that part of it is not exported."""

    def __init__(self, mode: str = "error"):
        if mode not in OTHER_SHAPES:
            raise ConfigError(f"other_shapes in {OTHER_SHAPES}", repr(mode),
                              "Use 'error' (static shapes only) or 'torch' (run other shapes in PyTorch).")
        self.mode = mode
        self.calls = 0          # block calls run in PyTorch (all threads)
        self._warned = False
        self._lock = threading.Lock()

    def fall_back(self, block: str, error: InputMismatchError) -> None:
        """Raise ``error`` in "error" mode; otherwise count the call and warn the first time."""
        if self.mode == "error":
            raise error
        with self._lock:
            self.calls += 1
            first, self._warned = not self._warned, True
        if first:
            warnings.warn(f"elastic_compile runtime: block {block} called with shapes its graphs were not exported "
                          f"for ({error.found}); such calls run in PyTorch (slower). Export again with these "
                          "inputs to run them in the backend.", RuntimeWarning, stacklevel=4)


class BlockExecutor:
    """Callable with the block's forward signature; runs the exported graph of ``gate.control.bucket``."""

    def __init__(self, gate, entry: dict, root: Path, backend, dtype: str, dense_bucket: int,
                 summaries: PooledSummaries | None = None, lookahead: LookaheadLogits | None = None,
                 other_shapes: OtherShapes | None = None):
        self.gate = gate
        self.other_shapes = other_shapes or OtherShapes()
        self.torch_forward = gate.torch_forward
        self.path = entry["path"]
        self.layout = CallLayout.from_dict(entry["layout"])
        self.outputs = OutputLayout.from_dict(entry["outputs"])
        self.complex_inputs = list(entry.get("complex_inputs", []))
        self.files = {int(b): {int(n): root / f for n, f in sizes.items()} for b, sizes in entry["graphs"].items()}
        self.backend = backend
        self.dtype = DTYPES[dtype]
        self.dense_bucket = dense_bucket
        self.batched = [leaf.batched for leaf in self.layout.inputs]
        self.pooled = list(entry.get("pooled_outputs", []))
        self.summary_eps = float(entry.get("summary_eps", 0.0))
        self.num_outputs = sum(leaf["kind"] == "tensor" for leaf in self.outputs.leaves)
        self.summaries = summaries
        ahead = entry.get("lookahead")
        self.lookahead = lookahead if ahead else None
        self.lookahead_block = int(ahead["block"]) if ahead else None
        self.lookahead_sources = [(kind, int(k)) for kind, k in ahead["sources"]] if ahead else []

    def graph(self, bucket: int, size: int) -> Callable:
        return self.backend.graph(self.files[bucket][size])

    def __call__(self, *args, **kwargs):
        if self.gate.state.profiling:
            return self.torch_forward(*args, **kwargs)  # FLOP profiling on shapes only (stats)
        # Between two graphs every Python step runs with cold caches: the usual call is matched in one pass over
        # its leaves (``fast_match``), and casts, copies, slices and moves happen only where a tensor needs them.
        matched = self.layout.fast_match(args, kwargs)
        if matched is None:
            values = self.layout.flatten(args, kwargs)
            leaves = values if values is not None else pytree.tree_leaves((args, kwargs))
            if any(isinstance(v, FakeTensor) for v in leaves):
                return self.torch_forward(*args, **kwargs)
        if self.gate.control.unit_masks:
            raise ConfigError("hard decisions on an exported runtime", "soft unit masks (router training)",
                              "Train routers on the PyTorch elastic model, then export again.")
        bucket = self.dense_bucket if self.gate.control.bucket is None else self.gate.control.bucket
        if bucket not in self.files:
            raise BucketNotExportedError(f"a width bucket exported for block {self.path} ({sorted(self.files)})",
                                         f"bucket {bucket}", "Force an exported width, or export all buckets.")
        if matched is None:
            try:
                matched = self.layout.match_values(values, self.path)
            except InputMismatchError as error:
                self.other_shapes.fall_back(self.path, error)
                return self.torch_forward(*args, **kwargs)
        tensors, rows = matched
        device = tensors[0].device if tensors else torch.device("cpu")
        target = self.backend.device
        inputs = [t if t.device == target else t.to(target)
                  for t in graph_inputs(tensors, self.dtype, self.complex_inputs)]
        sizes = self.files[bucket]
        if rows in sizes:  # one graph call, no padding
            outs = self.graph(bucket, rows)(inputs)
        else:
            parts, start = [], 0
            for count, size in plan_chunks(rows, sizes):
                feed = [pad_rows(t[start:start + count], size) if batched else t
                        for t, batched in zip(inputs, self.batched)]
                parts.append([out[:count] for out in self.graph(bucket, size)(feed)])
                start += count
            outs = parts[0] if len(parts) == 1 else [torch.cat(chunk) for chunk in zip(*parts)]
        result = self.outputs.pack(outs[:self.num_outputs], device)
        summarised = self.summaries is not None and self.pooled
        streams = self.outputs.tensors_of(result) if summarised or self.lookahead is not None else None
        if summarised:
            for k, summary in zip(self.pooled, outs[self.num_outputs:]):
                self.summaries.remember(streams[k], summary, self.summary_eps)
        if self.lookahead is not None:  # the graph's last output: the next block's router logits
            sources = [streams[k] if kind == "out" else tensors[k] for kind, k in self.lookahead_sources]
            self.lookahead.remember(self.lookahead_block, sources, outs[-1])
        return result


class GraphRouter:
    """A router run from its ONNX graph: ``(arguments by name) -> (run_logit, width_logits[, action_logits])``, as
    the PyTorch router it was exported from (whose output counts it keeps)."""

    def __init__(self, graph: Callable, names: list[str], num_widths: int, num_actions: int = 0):
        self.graph = graph
        self.names = names
        self.num_widths = num_widths
        self.num_actions = num_actions

    def __call__(self, arguments: dict):
        tensors = [arguments[name] for name in self.names]
        device = tensors[0].device
        return tuple(out.to(device) for out in self.graph([t.contiguous() for t in tensors]))

    def logits(self, arguments: dict) -> torch.Tensor:
        """``(B, 1 + num_widths + num_actions)``, as :meth:`Router.logits`."""
        run_logit, *rest = self(arguments)
        return torch.cat([run_logit[:, None], *rest], dim=1)


class SingleThreadRouter:
    """Runs a PyTorch router on one intra-op thread, between two ONNX Runtime block calls.

    A multi-threaded PyTorch op there wakes PyTorch's thread pool, whose spinning workers then compete with ONNX
    Runtime's threads for the same cores, slowing the whole forward far more than the routers' own time. A router's
    few small ops lose nothing on one thread.
    """

    def __init__(self, router):
        self.router = router
        self.num_widths = router.num_widths
        self.num_actions = router.num_actions

    def __call__(self, arguments: dict):
        return self._single_threaded(self.router, arguments)

    def logits(self, arguments: dict) -> torch.Tensor:
        return self._single_threaded(self.router.logits, arguments)

    def decision_memo(self):
        """The wrapped router's decision memo (:mod:`elastic_compile.nn.decision_memo`), if it has one."""
        memo = getattr(self.router, "decision_memo", None)
        return None if memo is None else memo()

    @staticmethod
    def _single_threaded(fn, arguments: dict):
        if torch.get_num_threads() == 1:
            return fn(arguments)
        with using_torch_threads(1):  # counted: concurrent callers restore the count once, after the last
            return fn(arguments)

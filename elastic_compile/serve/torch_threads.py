"""How many intra-op threads PyTorch uses for the parts of a runtime's forward outside the backend's graphs.

With ONNX Runtime on the CPU, a forward alternates between block graphs (ONNX Runtime's threads) and PyTorch (the
parts outside the blocks: embeddings, patchify, final layer; the gates' and routers' few small ops). ONNX
Runtime's worker threads keep spinning for a while after each graph (the shared global pool always does; there
is no Python setting to turn it off), and a multi-threaded PyTorch op started then puts PyTorch's OpenMP worker on
a core that a spinning ONNX Runtime thread already holds, and waits for it. These parts are small ops that lose
nothing on one thread, so the ONNX Runtime runtime runs them single-threaded by default
(``ec.runtime.load(..., torch_threads=...)``; ``benchmarks/results/speed.md`` measures the setting).
"""
from __future__ import annotations

import contextlib
import threading

import torch

from ..errors import ConfigError

#: ``torch_threads="auto"``: 1 thread around an ONNX Runtime forward; other backends leave PyTorch as it is
#: (TensorRT runs the PyTorch parts on the GPU, the "torch" backend *is* the PyTorch model).
AUTO = "auto"


def resolve_torch_threads(value, backend: str) -> int | None:
    """The PyTorch thread count a runtime's forward uses (None: leave PyTorch's setting alone)."""
    if value == AUTO:
        return 1 if backend == "onnxruntime" else None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError("torch_threads: a thread count >= 1, None (leave PyTorch as it is) or 'auto'", repr(value),
                          "Pass torch_threads=1 (the default with onnxruntime), None, or a positive int.")
    return value


#: Callers inside :func:`using_torch_threads` now (all threads), and the count to restore when the last leaves.
_users = 0
_restore: int | None = None
_lock = threading.Lock()


@contextlib.contextmanager
def using_torch_threads(threads: int | None):
    """PyTorch's intra-op thread count set to ``threads`` inside the block and restored after it (also when the
    block raises). ``None`` or the current count: nothing is changed. The setting is process-wide: PyTorch work
    in other Python threads during the block runs with it too. Concurrent callers (a runtime called from several
    threads) are counted: the count the first one found is restored when the last one leaves, so overlapping
    calls never leave PyTorch at another count than before them (while calls overlap, the first one's count
    holds)."""
    global _users, _restore
    if threads is None:
        yield
        return
    with _lock:
        if _users == 0:
            previous = torch.get_num_threads()
            _restore = previous if previous != threads else None
            if _restore is not None:
                torch.set_num_threads(threads)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _restore is not None:
                torch.set_num_threads(_restore)
                _restore = None

"""ONNX Runtime backend: one CPU ``InferenceSession`` per graph file, created on first use.

Sessions use full graph optimisations (constant folding, fusions: the exported graphs keep their weights as
plain initializers on purpose, see :mod:`elastic_compile.export.onnx_io`), sequential execution, no spin-waiting,
and a configurable number of intra-op threads (default: ``torch.get_num_threads()``, so ORT and the torch parts
of a model share the same cores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import BackendUnavailableError, ExportError


def session_options(threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # No busy-waiting between ops: the PyTorch parts of the model run on the same cores, and spinning ORT
    # threads slow them down badly on small, shared machines (measured: 2 threads, 915 -> 628 ms per forward).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def create_session(path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None):
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise BackendUnavailableError("onnxruntime", f"import failed: {exc}", "pip install onnxruntime") from exc
    try:
        return ort.InferenceSession(str(path), session_options(threads),
                                    providers=list(providers or ["CPUExecutionProvider"]))
    except Exception as exc:
        raise ExportError(f"onnxruntime to load {Path(path).name}", f"{type(exc).__name__}: {str(exc)[:300]}",
                          "Check the dtype (onnxruntime CPU has no bfloat16 kernels) or export again.") from exc


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor; a copy only when it needs one (grad, another device, strided)."""
    if tensor.requires_grad or not tensor.is_cpu or not tensor.is_contiguous():
        tensor = tensor.detach().cpu().contiguous()
    return tensor.numpy()


class OrtGraph:
    """Callable: a list of torch tensors in, a list of torch tensors out (CPU)."""

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None):
        self.path = Path(path)
        self.session = create_session(path, threads, providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.feeds = [(name, int(name.rsplit("_", 1)[1])) for name in self.input_names]

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors[k]`` feeds graph input ``in_<k>`` (inputs a graph does not use may be absent from it)."""
        feed = {name: _to_numpy(tensors[k]) for name, k in self.feeds}
        return [torch.from_numpy(out) for out in self.session.run(self.output_names, feed)]


class OnnxRuntimeBackend:
    """Opens graph files as :class:`OrtGraph` (cached per path)."""

    name = "onnxruntime"
    device = torch.device("cpu")

    def __init__(self, threads: int | None = None, providers: Sequence[str] | None = None):
        self.threads = threads
        self.providers = providers
        self._graphs: dict[Path, OrtGraph] = {}

    def graph(self, path: Path) -> OrtGraph:
        if path not in self._graphs:
            self._graphs[path] = OrtGraph(path, self.threads, self.providers)
        return self._graphs[path]

    router_graph = graph

    def close(self) -> None:
        self._graphs.clear()

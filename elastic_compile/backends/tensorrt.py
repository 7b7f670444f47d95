"""TensorRT backend: one engine per exported block graph, from a validated engine cache, sharing device memory.

Written against the official TensorRT Python API (10.x and 11.x); it cannot run in this project's CI (no
TensorRT, no GPU), so everything that does not need TensorRT lives in :mod:`.engine_cache` and is unit-tested.

Build (:func:`build_serialized_engine`): ``trt.Builder`` -> ``create_network`` with the ``STRONGLY_TYPED`` flag
(always on in TensorRT 11, where the flag is deprecated and ignored; the graph's own dtypes decide precision) ->
``trt.OnnxParser.parse_from_file`` (external weight files resolve relative to the graph) -> builder config
with ``builder_optimization_level`` and a timing cache shared by all builds (loaded from and saved to the engine
cache directory) -> ``build_serialized_network``. Shapes are static (one graph per batch size), so no
optimisation profiles are needed.

Run (:class:`TrtGraph`): every engine gets an execution context *without* its own device memory
(``ExecutionContextAllocationStrategy.USER_MANAGED``, or ``create_execution_context_without_device_memory`` on
older versions); :class:`TensorRTBackend` allocates one scratch buffer sized to the largest
``device_memory_size_v2`` and gives it to every context (engines run one at a time, on one stream). Inputs are
copied into static buffers, outputs come from static buffers (torch CUDA tensors) bound with
``set_tensor_address``; ``execute_async_v3`` runs on the backend's stream, optionally replayed from a CUDA graph
captured per engine after a warm-up run.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import torch

from ..artifact.manifest import sha256_file
from ..errors import BackendUnavailableError, ConfigError, EngineCacheError
from .engine_cache import EngineCache, EngineKey

logger = logging.getLogger("elastic_compile")

DEFAULT_OPTIMIZATION_LEVEL = 3


def import_tensorrt():
    """The ``tensorrt`` module; BackendUnavailableError (with the reason) when it cannot be imported."""
    try:
        import tensorrt as trt
    except Exception as exc:  # ImportError, or OSError from missing libnvinfer
        raise BackendUnavailableError("TensorRT (the tensorrt Python package with its libraries)",
                                      f"{type(exc).__name__}: {exc}",
                                      "Install TensorRT on a CUDA machine (pip install tensorrt), or use "
                                      "backend='onnxruntime'.") from exc
    return trt


def tensorrt_available() -> tuple[bool, str]:
    """(True, version) when TensorRT and a CUDA device are usable, else (False, why)."""
    try:
        trt = import_tensorrt()
    except BackendUnavailableError as exc:
        return False, exc.found
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    return True, trt.__version__


def build_flags(optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL, workspace_bytes: int | None = None) -> dict:
    """The build options that go into every engine key (a change rebuilds the engines)."""
    if not 0 <= int(optimization_level) <= 5:
        raise ConfigError("builder optimization level in 0..5", f"{optimization_level}", "TensorRT's default is 3.")
    return {"strongly_typed": True, "optimization_level": int(optimization_level),
            "workspace_bytes": workspace_bytes, "static_shapes": True}


def engine_key(onnx_path: Path, weight_paths: Sequence[Path], trt_version: str, device: torch.device,
               flags: dict, hashes: dict[Path, str] | None = None) -> EngineKey:
    hashes = hashes if hashes is not None else {}

    def digest(path: Path) -> str:
        if path not in hashes:
            hashes[path] = sha256_file(path)
        return hashes[path]

    props = torch.cuda.get_device_properties(device)
    return EngineKey.make(digest(onnx_path), [digest(p) for p in weight_paths], trt_version, props.name,
                          (props.major, props.minor), flags)


def build_serialized_engine(trt, onnx_path: Path, flags: dict, cache: EngineCache, trt_logger) -> bytes:
    """Parse ``onnx_path`` into a strongly typed network and build a serialized engine (timing cache shared)."""
    builder = trt.Builder(trt_logger)
    network_flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineCacheError(f"TensorRT to parse {onnx_path.name}", errors or "a parser failure",
                               "Check the TensorRT version's ONNX operator support.")
    config = builder.create_builder_config()
    config.builder_optimization_level = flags["optimization_level"]
    if flags.get("workspace_bytes"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(flags["workspace_bytes"]))
    timing = config.create_timing_cache(cache.read_timing_cache())
    if not config.set_timing_cache(timing, False):  # a cache from another TensorRT/GPU: start an empty one
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineCacheError(f"an engine for {onnx_path.name}", "build_serialized_network returned None",
                               "See the TensorRT log.")
    cache.write_timing_cache(bytes(config.get_timing_cache().serialize()))
    return bytes(serialized)


def _torch_dtype(trt, dtype) -> torch.dtype:
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32, trt.int8: torch.int8,
             trt.bool: torch.bool}
    for name, value in (("bfloat16", torch.bfloat16), ("int64", torch.int64), ("uint8", torch.uint8)):
        if hasattr(trt, name):
            table[getattr(trt, name)] = value
    return table[dtype]


class TrtGraph:
    """One engine with its context and static I/O buffers; ``graph(tensors) -> outputs`` on the backend stream."""

    def __init__(self, trt, engine, device: torch.device, stream: torch.cuda.Stream, cuda_graph: bool):
        self.trt, self.engine, self.device, self.stream = trt, engine, device, stream
        self.use_cuda_graph = cuda_graph
        self.cuda_graph = None
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        order = lambda n: int(n.rsplit("_", 1)[-1])  # in_<k> / out_<k>, as the exporter named them
        self.input_names = sorted((n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT), key=order)
        self.output_names = sorted((n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT), key=order)
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            self.context = engine.create_execution_context(strategy.USER_MANAGED)
        else:
            self.context = engine.create_execution_context_without_device_memory()
        self.buffers = {}
        for name in self.input_names + self.output_names:
            shape = tuple(engine.get_tensor_shape(name))
            self.buffers[name] = torch.empty(shape, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)), device=device)
            self.context.set_tensor_address(name, self.buffers[name].data_ptr())

    @property
    def device_memory_size(self) -> int:
        return int(getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size)

    def attach_device_memory(self, scratch: torch.Tensor) -> None:
        try:
            self.context.set_device_memory(scratch.data_ptr(), scratch.numel())
        except (AttributeError, TypeError):  # TensorRT < 10.1: property, size implied
            self.context.device_memory = scratch.data_ptr()

    def _execute(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise EngineCacheError("execute_async_v3 to succeed", "False", "See the TensorRT log.")

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            for name in self.input_names:  # in_<k> takes tensors[k]
                self.buffers[name].copy_(tensors[int(name.rsplit("_", 1)[1])], non_blocking=True)
            if self.cuda_graph is not None:
                self.cuda_graph.replay()
            else:
                self._execute()
                if self.use_cuda_graph:  # warm-up done: capture the enqueue for replays
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        self._execute()
                    self.cuda_graph = graph
            outputs = [self.buffers[name].clone() for name in self.output_names]
        torch.cuda.current_stream(self.device).wait_stream(self.stream)
        return outputs


def _weights_by_graph(root: Path, manifest: dict) -> dict[Path, list[Path]]:
    table = {}
    for block in manifest["blocks"]:
        for sizes in block["graphs"].values():
            for file in sizes.values():
                table[root / file] = [root / block["weights"]]
    return table


class TensorRTBackend:
    """Engines for every block graph of an export, built or loaded from ``cache_dir`` at construction."""

    name = "tensorrt"

    def __init__(self, root: Path, manifest: dict, cache_dir=None, device=None,
                 optimization_level: int = DEFAULT_OPTIMIZATION_LEVEL, workspace_bytes: int | None = None,
                 cuda_graphs: bool = False, log_level: str = "WARNING"):
        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("a CUDA device for TensorRT", "none", "Use backend='onnxruntime' on CPU.")
        self.trt = trt
        self.device = torch.device(device or "cuda")
        self.cache = EngineCache(cache_dir or Path(root) / "engines")
        self.flags = build_flags(optimization_level, workspace_bytes)
        self.stream = torch.cuda.Stream(self.device)
        trt_logger = trt.Logger(getattr(trt.Logger, log_level))
        runtime = trt.Runtime(trt_logger)
        hashes = {Path(root) / name: digest for name, digest in manifest.get("files", {}).items()}
        self.graphs: dict[Path, TrtGraph] = {}
        with torch.cuda.device(self.device):
            for onnx_path, weights in _weights_by_graph(Path(root), manifest).items():
                key = engine_key(onnx_path, weights, trt.__version__, self.device, self.flags, hashes)
                engine = self.cache.get_or_build(
                    key, lambda p=onnx_path: build_serialized_engine(trt, p, self.flags, self.cache, trt_logger),
                    runtime.deserialize_cuda_engine)
                self.graphs[onnx_path] = TrtGraph(trt, engine, self.device, self.stream, cuda_graphs)
            size = max((g.device_memory_size for g in self.graphs.values()), default=0)
            self.scratch = torch.empty(max(size, 1), dtype=torch.uint8, device=self.device)
            for graph in self.graphs.values():
                graph.attach_device_memory(self.scratch)
        logger.info("TensorRT: %d engines, shared device memory %.1f MiB", len(self.graphs), size / 2**20)

    def graph(self, path: Path) -> TrtGraph:
        return self.graphs[Path(path)]

    def router_graph(self, path: Path):
        raise ConfigError("routers='torch' with the TensorRT backend", "routers='onnx'",
                          "Router graphs have a dynamic batch; they run in PyTorch (on the GPU) with TensorRT.")

    def close(self) -> None:
        self.graphs.clear()
        self.scratch = None


def prebuild_engines(root: Path, manifest: dict, options: dict) -> dict:
    """Manifest entry for ``backend='tensorrt'`` exports: engines built now into ``root/engines`` when TensorRT
    and a GPU are present, else a note that they are built on the target machine at first load."""
    available, detail = tensorrt_available()
    if not available:
        return {"engines": None, "note": f"TensorRT unavailable at export: {detail}"}
    backend = TensorRTBackend(root, manifest, cache_dir=root / "engines", **options)
    entry = {"engines": "engines", "tensorrt": detail, "gpu": torch.cuda.get_device_name(backend.device),
             "flags": backend.flags, "count": len(backend.graphs)}
    backend.close()
    return entry

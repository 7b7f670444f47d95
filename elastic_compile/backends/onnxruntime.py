"""ONNX Runtime backend: one ``InferenceSession`` per graph file, created on first use, on the execution providers
named (default the CPU one; ``CUDAExecutionProvider`` with onnxruntime-gpu: inputs and outputs then stay on the
GPU, bound by IOBinding, see :class:`OrtGraph`).

Sessions use full graph optimisations (constant folding, fusions: the exported graphs keep their weights as
plain initializers on purpose, see :mod:`elastic_compile.export.onnx_io`), sequential execution, no spin-waiting,
and a configurable number of intra-op threads (default: ``torch.get_num_threads()``, so ORT and the torch parts
of a model share the same cores).

Thread pools: by default every session owns its intra-op pool ("per_session"). A runtime calls a dozen or more
sessions one after another per forward, and each call then wakes its own pool's long-idle threads, which costs
most on small graphs. ``thread_pool="shared"`` puts every session on ONNX Runtime's *global* intra-op pool. That pool is process-wide: once it is on, ONNX Runtime
refuses sessions created elsewhere in the process with per-session threads (their options must set
``use_per_session_threads = False``), so it is opt-in for library use and the default of the command line, whose
process is the runtime's alone. While the global pool is on (set here or by the application), every session of
this backend uses it.

Memory: by default every session takes its memory from one CPU arena registered once per process with ONNX
Runtime's environment ("shared", the ``session.use_env_allocators`` option; sessions created elsewhere in the
process are unaffected unless they opt in), so every graph's run reuses the chunks the previous one just freed,
still in cache, and the runtime holds one set of activation buffers instead of one per graph. With an arena per
session each block graph's activations live in memory of their own, last touched a whole forward earlier, which
slows the memory-bound kernels (elementwise ops, normalisations). ``memory_arena="per_session"`` keeps ONNX
Runtime's default. ``benchmarks/results/speed.md`` has what each setting measured.
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import BackendUnavailableError, ConfigError, ExportError, InputMismatchError

THREAD_POOLS = ("per_session", "shared")
MEMORY_ARENAS = ("shared", "per_session")
ARENA_EXTEND_SAME_AS_REQUESTED = 1  # onnxruntime's ArenaExtendStrategy::kSameAsRequested

#: Threads of ONNX Runtime's global intra-op pool once this process turned it on (it cannot be resized).
_shared_pool_threads: int | None = None


def use_shared_thread_pool(threads: int | None = None) -> int:
    """Turn on ONNX Runtime's global intra-op pool with ``threads`` threads (default ``torch.get_num_threads()``)
    for the rest of the process, or check that the pool already on has that many. Returns its size."""
    global _shared_pool_threads
    import onnxruntime as ort

    threads = int(threads if threads is not None else torch.get_num_threads())
    if _shared_pool_threads is None:
        ort.set_global_thread_pool_sizes(threads, 1)
        _shared_pool_threads = threads
    elif threads != _shared_pool_threads:
        raise ConfigError(f"{threads} intra-op threads", f"ONNX Runtime's shared pool already runs "
                          f"{_shared_pool_threads} (it is process-wide and fixed once created)",
                          f"Pass threads={_shared_pool_threads}, or run the other thread count in another process.")
    return threads


def select_thread_pool(thread_pool: str, threads: int | None = None) -> None:
    """Check ``thread_pool`` and, for "shared", turn on (or check) the process-wide pool."""
    if thread_pool not in THREAD_POOLS:
        raise ConfigError(f"thread_pool in {THREAD_POOLS}", repr(thread_pool),
                          "Use 'shared' (fastest, process-wide) or 'per_session'.")
    if thread_pool == "shared":
        use_shared_thread_pool(threads)


#: Whether this process registered the shared CPU arena (None: not tried yet; False: ONNX Runtime refused it).
_shared_arena: bool | None = None


def use_shared_cpu_arena() -> bool:
    """Register one CPU arena allocator with ONNX Runtime's environment (once per process) for the sessions that
    opt in with ``session.use_env_allocators``. The arena grows by what is requested (no power-of-two rounding).
    Returns whether the shared arena is available; where ONNX Runtime refuses it, sessions keep their own."""
    global _shared_arena
    if _shared_arena is None:
        import onnxruntime as ort

        memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        try:
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, ARENA_EXTEND_SAME_AS_REQUESTED, -1, -1))
            _shared_arena = True
        except Exception as exc:  # registering again does not raise (onnxruntime 1.32): this is a real refusal
            _shared_arena = False
            warnings.warn(f"onnxruntime refused a shared CPU arena ({exc}); every session keeps its own.",
                          RuntimeWarning, stacklevel=2)
    return _shared_arena


def select_memory_arena(memory_arena: str) -> bool:
    """Check ``memory_arena``; for "shared", register the process's arena. Returns whether sessions opt in."""
    if memory_arena not in MEMORY_ARENAS:
        raise ConfigError(f"memory_arena in {MEMORY_ARENAS}", repr(memory_arena),
                          "Use 'shared' (one arena for every graph of the process) or 'per_session'.")
    return memory_arena == "shared" and use_shared_cpu_arena()


def session_options(threads: int | None = None, shared_pool: bool = False, shared_arena: bool = False):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if shared_pool:
        options.use_per_session_threads = False
    else:
        options.intra_op_num_threads = int(threads if threads is not None else torch.get_num_threads())
        options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # No busy-waiting between ops: the PyTorch parts of the model run on the same cores, and spinning ORT
    # threads would take those cores from them.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


def create_session(path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                   thread_pool: str = "per_session", memory_arena: str = "shared"):
    try:
        import onnxruntime as ort
    except ImportError as exc:  # pragma: no cover - onnxruntime is a dependency
        raise BackendUnavailableError("onnxruntime", f"import failed: {exc}", "pip install onnxruntime") from exc
    select_thread_pool(thread_pool, threads)  # before the arena: the global pool must exist before the environment
    arena = select_memory_arena(memory_arena)
    shared = _shared_pool_threads is not None
    providers = list(providers or ["CPUExecutionProvider"])
    try:
        return ort.InferenceSession(str(path), session_options(threads, shared, arena), providers=providers)
    except Exception as exc:
        if not shared and "global thread pool" in str(exc):  # the application turned the global pool on
            return ort.InferenceSession(str(path), session_options(threads, True, arena), providers=providers)
        raise ExportError(f"onnxruntime to load {Path(path).name}", f"{type(exc).__name__}: {str(exc)[:300]}",
                          "Check the dtype (onnxruntime CPU has no bfloat16 kernels) or export again.") from exc


#: torch dtypes ONNX Runtime binds directly, as the NumPy element types IOBinding names them by.
BINDABLE = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
            torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}
#: ONNX type strings of graph outputs and the torch dtype each becomes.
ONNX_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32, "tensor(int8)": torch.int8,
              "tensor(uint8)": torch.uint8, "tensor(bool)": torch.bool}
IO_BINDING = ("auto", "on", "off")


def check_providers(providers: Sequence | None) -> list:
    """``providers`` (names, or ``(name, options)`` pairs, as ONNX Runtime takes them; default the CPU one), each
    one this onnxruntime build has; BackendUnavailableError naming the ones it has otherwise."""
    import onnxruntime as ort

    providers = list(providers or ["CPUExecutionProvider"])
    available = ort.get_available_providers()
    for provider in providers:
        name = provider[0] if isinstance(provider, (tuple, list)) else provider
        if not isinstance(name, str) or name not in available:
            raise BackendUnavailableError(f"an onnxruntime execution provider among {available}", repr(name),
                                          "Install the onnxruntime build that has it (e.g. onnxruntime-gpu for "
                                          "CUDAExecutionProvider), or name one of those.")
    return providers


def provider_device(providers: Sequence | None) -> torch.device:
    """Where the first provider computes: CUDA for CUDAExecutionProvider (its ``device_id`` option), else CPU."""
    first = (providers or ["CPUExecutionProvider"])[0]
    name, options = (first[0], first[1]) if isinstance(first, (tuple, list)) else (first, {})
    if name == "CUDAExecutionProvider":
        return torch.device("cuda", int(dict(options).get("device_id", 0)))
    return torch.device("cpu")


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor; a copy only when it needs one (grad, another device, strided)."""
    if tensor.requires_grad or not tensor.is_cpu or not tensor.is_contiguous():
        tensor = tensor.detach().cpu().contiguous()
    return tensor.numpy()


class OrtGraph:
    """Callable: a list of torch tensors in, a list of torch tensors out, on the inputs' device.

    Two ways in and out. NumPy (CPU inputs, the default there): inputs are NumPy views of the tensors and outputs
    wrap the arrays ONNX Runtime returns, no copy either way. IOBinding (``io_binding="on"``, and "auto" for
    inputs on another device, e.g. CUDA with CUDAExecutionProvider): each input is bound where it lies by its
    data pointer and each output is written into a torch tensor allocated on that device (output shapes come
    from the graph, symbolic dimensions from the inputs that share their name), so nothing passes through host
    memory; an output whose shape cannot be known first is allocated by ONNX Runtime and copied once.
    """

    def __init__(self, path: str | Path, threads: int | None = None, providers: Sequence[str] | None = None,
                 thread_pool: str = "per_session", memory_arena: str = "shared", io_binding: str = "auto"):
        if io_binding not in IO_BINDING:
            raise ConfigError(f"io_binding in {IO_BINDING}", repr(io_binding), "Use 'auto', 'on' or 'off'.")
        self.path = Path(path)
        self.io_binding = io_binding
        self.session = create_session(path, threads, providers, thread_pool, memory_arena)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        self.input_names = [i.name for i in inputs]
        self.output_names = [o.name for o in outputs]
        self.feeds = [(name, int(name.rsplit("_", 1)[1])) for name in self.input_names]
        self.input_shapes = [list(i.shape) for i in inputs]
        self.output_meta = [(list(o.shape), ONNX_TYPES.get(o.type)) for o in outputs]

    def __call__(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``tensors[k]`` feeds graph input ``in_<k>`` (inputs a graph does not use may be absent from it)."""
        fed = [tensors[k] for _, k in self.feeds]
        if self.io_binding == "on" or (self.io_binding == "auto" and any(not t.is_cpu for t in fed)):
            return self._run_bound(fed)
        feed = {name: _to_numpy(tensors[k]) for name, k in self.feeds}
        try:
            outputs = self.session.run(self.output_names, feed)
        except Exception as exc:  # onnxruntime's own exception types, e.g. a batch that differs between inputs
            raise self._mismatch([v.shape for v in feed.values()], exc) from exc
        return [torch.from_numpy(out) for out in outputs]

    def _mismatch(self, shapes, exc: Exception) -> InputMismatchError:
        return InputMismatchError(f"inputs that {self.path.name} runs on",
                                  f"{[tuple(s) for s in shapes]}: {str(exc).splitlines()[0][:300]}",
                                  "Call the model with one batch size for every batched input.")

    def _run_bound(self, fed: list[torch.Tensor]) -> list[torch.Tensor]:
        device = fed[0].device if fed else torch.device("cpu")
        binding = self.session.io_binding()
        held, dims = [], {}
        for name, shape, tensor in zip(self.input_names, self.input_shapes, fed):
            tensor = tensor.detach()
            if tensor.dtype not in BINDABLE:
                raise InputMismatchError(f"inputs of a dtype ONNX Runtime binds ({sorted(map(str, BINDABLE))})",
                                         f"{tensor.dtype} for {name} of {self.path.name}", "Export in fp32 or fp16.")
            tensor = tensor.to(device).contiguous()
            held.append(tensor)  # alive until the run is over: ONNX Runtime reads its memory
            dims.update((d, size) for d, size in zip(shape, tensor.shape) if isinstance(d, str))
            binding.bind_input(name, device.type, device.index or 0, BINDABLE[tensor.dtype], tuple(tensor.shape),
                               tensor.data_ptr())
        outputs: list[torch.Tensor | None] = []
        for name, (shape, dtype) in zip(self.output_names, self.output_meta):
            known = [d if isinstance(d, int) else dims.get(d) for d in shape]
            if dtype is None or dtype not in BINDABLE or any(not isinstance(d, int) for d in known):
                binding.bind_output(name, device.type, device.index or 0)
                outputs.append(None)
                continue
            out = torch.empty(known, dtype=dtype, device=device)
            binding.bind_output(name, device.type, device.index or 0, BINDABLE[dtype], tuple(known), out.data_ptr())
            outputs.append(out)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise self._mismatch([t.shape for t in held], exc) from exc
        if any(out is None for out in outputs):
            values = binding.get_outputs()
            outputs = [torch.from_numpy(values[i].numpy()).to(device) if out is None else out
                       for i, out in enumerate(outputs)]
        return outputs


class OnnxRuntimeBackend:
    """Opens graph files as :class:`OrtGraph` (cached per path)."""

    name = "onnxruntime"

    def __init__(self, threads: int | None = None, providers: Sequence[str] | None = None,
                 thread_pool: str = "per_session", memory_arena: str = "shared", io_binding: str = "auto"):
        if io_binding not in IO_BINDING:
            raise ConfigError(f"io_binding in {IO_BINDING}", repr(io_binding), "Use 'auto', 'on' or 'off'.")
        providers = check_providers(providers)
        self.device = provider_device(providers)  # where the block executors hand the graphs their inputs
        self.io_binding = io_binding
        # Fixed now: sessions open on first use, inside a forward whose PyTorch may run on fewer threads.
        threads = int(threads if threads is not None else torch.get_num_threads())
        select_thread_pool(thread_pool, threads)  # now: a thread-count clash is an error at load, not first call
        select_memory_arena(memory_arena)
        self.threads = threads
        self.memory_arena = memory_arena
        self.providers = providers
        self.thread_pool = thread_pool
        self._graphs: dict[Path, OrtGraph] = {}
        self._opening = threading.Lock()

    def graph(self, path: Path) -> OrtGraph:
        """The session of ``path``, opened on first use (once: concurrent first calls wait for the same one).
        ``InferenceSession.run`` is safe to call from several threads at once."""
        graph = self._graphs.get(path)
        if graph is None:
            with self._opening:
                graph = self._graphs.get(path)
                if graph is None:
                    graph = self._graphs[path] = OrtGraph(path, self.threads, self.providers, self.thread_pool,
                                                          self.memory_arena, self.io_binding)
        return graph

    router_graph = graph

    def close(self) -> None:
        self._graphs.clear()

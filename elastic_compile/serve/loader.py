"""``load(out_dir, backend)``: a deployable runtime from an export directory.

The runtime rebuilds the base model from ``base/``, installs the elastic artifact (``elastic/``: analysis,
permutations, routers), and, for the "onnxruntime" and "tensorrt" backends, puts a
:class:`~.executor.BlockExecutor` in place of every block's original forward. Everything else stays the
PyTorch elastic model's: the parts outside the blocks (with ONNX Runtime, run from the export's ``outside/``
graphs by a :class:`~.driver.ModelDriver` where it has them), the routers' weights, the gates with their per-sample
decisions, skips, grouping and records. With ONNX Runtime, routers run by default as
:class:`~.host_router.HostRouter` (the same function in NumPy, reading the token summaries that the block graphs
computed: see :mod:`.summaries`; or not computed at all where the previous block's graph already returned the
router's logits: see :mod:`.lookahead`). Hence ``elastic_compile.force``, ``stats`` and ``report`` work on a
:class:`Runtime` exactly as on the PyTorch model, and outputs match it under the same decisions. The "torch"
backend is the elastic PyTorch model itself (baseline / fallback).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..artifact.base import diffusers_class, load_base
from ..artifact.manifest import MANIFEST, read_manifest
from ..backends.onnxruntime import OnnxRuntimeBackend
from ..backends.tensorrt import TensorRTBackend, tensorrt_available
from ..cache import cache_context, reset_cache
from ..errors import ArtifactError, BackendUnavailableError, ConfigError
from ..sampling import SamplingConfig, sample
from ..serialization import load as load_elastic
from ..state import ROUTER_ATTRIBUTE, STATE_ATTRIBUTE, gate_of, state_of
from .driver import ModelDriver
from .executor import BlockExecutor, GraphRouter, OtherShapes, SingleThreadRouter
from .host_router import HostRouter
from .lookahead import LookaheadLogits
from .summaries import PooledSummaries
from .torch_threads import AUTO, resolve_torch_threads, using_torch_threads

BACKENDS = ("onnxruntime", "tensorrt", "torch")
ROUTER_MODES = ("host", "torch", "onnx")


class Runtime:
    """An exported elastic model, callable with the model's own inputs (same arguments, same return value).

    ``runtime.model`` is the underlying PyTorch elastic model (blocks dispatched to the backend);
    ``runtime.sample(...)`` runs the class-conditional sampling loop on it. ``config``, ``dtype`` and ``device``
    are the model's, so a runtime can stand in for ``pipe.transformer`` in a diffusers pipeline (for the shapes it
    was exported for). A call runs the model with PyTorch
    at ``torch_threads`` intra-op threads (restored after the call; see :mod:`.torch_threads`); calling
    ``runtime.model`` directly skips that.
    """

    def __init__(self, model: nn.Module, manifest: dict, root: Path, backend_name: str, backend: Any,
                 torch_threads: int | None = None):
        self.model = model
        self.manifest = manifest
        self.root = root
        self.backend_name = backend_name
        self.backend = backend
        self.torch_threads = torch_threads
        self._scheduler = None

    @property
    def _elastic_state(self):  # found by elastic_compile.state.state_of: force / stats / report work
        return getattr(self.model, STATE_ATTRIBUTE)

    @property
    def driver(self):
        """The :class:`~.driver.ModelDriver` running the export's outside graphs, or None."""
        forward = self.model.__dict__.get("forward")
        return forward if isinstance(forward, ModelDriver) else None

    @property
    def device(self) -> torch.device:
        for param in self.model.parameters():
            return param.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The PyTorch model's dtype (what a diffusers pipeline casts its latents to)."""
        for param in self.model.parameters():
            return param.dtype
        return torch.float32

    @property
    def config(self):
        """The model's config (diffusers models: ``sample_size``, ``in_channels``, ...), so that the runtime can be a
        pipeline's ``transformer``; AttributeError for models without one."""
        return self.model.config

    @property
    def exported_inputs(self) -> dict:
        """The shapes the exported graphs serve: the example inputs' shapes and dtypes as the export recorded them
        (batched dimensions: any of ``batch_sizes``, padded up), and the batch sizes."""
        return {"inputs": self.manifest.get("inputs"), "batch_sizes": self.manifest["batch_sizes"]}

    def __call__(self, *args, **kwargs):
        with torch.no_grad(), using_torch_threads(self.torch_threads):
            return self.model(*args, **kwargs)

    # diffusers' cache protocol (what pipelines call on their transformer) ------------------------------------
    @contextlib.contextmanager
    def cache_context(self, name: str, **kwargs):
        """The elastic feature cache's context ``name`` (and the model's own ``cache_context``, for diffusers'
        hooks on it), so that a runtime can be the transformer of a pipeline that names its CFG branches."""
        with contextlib.ExitStack() as stack:
            if hasattr(self.model, "cache_context"):
                stack.enter_context(self.model.cache_context(name, **kwargs))
            stack.enter_context(cache_context(self.model, name))
            yield

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Called by every diffusers pipeline at the end of a call: the model's own reset, and ``reset_cache``."""
        if hasattr(self.model, "_reset_stateful_cache"):
            self.model._reset_stateful_cache(recurse=recurse)
        reset_cache(self.model)

    # sampling --------------------------------------------------------------------------------------------
    @property
    def scheduler(self):
        """The diffusers scheduler stored with the export (None when none was)."""
        entry = (self.manifest.get("sampling") or {}).get("scheduler")
        if self._scheduler is None and entry:
            scheduler_class = diffusers_class(entry["class"], "SchedulerMixin", str(self.root / MANIFEST))
            self._scheduler = scheduler_class.from_pretrained(str(self.root / entry["path"]))
        return self._scheduler

    @property
    def sampling_config(self):
        entry = (self.manifest.get("sampling") or {}).get("config")
        return SamplingConfig.load(self.root / entry) if entry else None

    def sample(self, class_labels, *, scheduler=None, config=None, **options) -> torch.Tensor:
        """Generate images with :func:`elastic_compile.sampling.sample` (options passed through), using
        the scheduler and sampling config stored with the export unless given."""
        scheduler = scheduler or self.scheduler
        config = config or self.sampling_config
        if scheduler is None or config is None:
            raise ConfigError("a scheduler and a SamplingConfig (stored at export, or passed here)",
                              f"scheduler={scheduler is not None}, config={config is not None}",
                              "Export with scheduler=... and sampling_config=..., or pass them to sample().")
        options.setdefault("device", self.device)
        return sample(self, scheduler, class_labels, config, **options)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()

    def __repr__(self) -> str:
        return (f"Runtime({self.root}, backend={self.backend_name}, blocks={len(self.manifest['blocks'])}, "
                f"dtype={self.manifest['dtype']}, batch_sizes={self.manifest['batch_sizes']})")


def load(path: str | os.PathLike, backend: str = "onnxruntime", *, threads: int | None = None,
         routers: str | None = None, free_torch_weights: bool | None = None, check_hashes: bool = True,
         device: str | torch.device | None = None, providers: Sequence[str] | None = None,
         engine_cache: str | os.PathLike | None = None, trt_options: dict | None = None,
         thread_pool: str = "per_session", memory_arena: str = "shared",
         torch_threads: int | str | None = AUTO, outside_graphs: bool = True, base_model: nn.Module | None = None,
         base_factory: str | Callable[[], nn.Module] | None = None, cache: str = "auto",
         io_binding: str = "auto", other_shapes: str = "error") -> Runtime:
    """Load an export directory written by :func:`elastic_compile.export`.

    Nothing the directory holds is imported or run as code; its files are checked against the manifest's hashes
    (``check_hashes``) and its manifest's values before use (errors: ArtifactError naming the file).

    Args:
        base_model, base_factory: the architecture of the base model, from you: a model (its weights are replaced
            by the export's), or a function / ``package.module:factory`` name building one. Required for exports of
            models that are not diffusers models (the manifest names the factory they were exported with, but
            elastic_compile never imports a name it read from a file); optional otherwise.
        backend: "onnxruntime" (CPU sessions), "tensorrt" (engines from the engine cache, CUDA) or "torch".
        threads: onnxruntime intra-op threads (default ``torch.get_num_threads()``).
        thread_pool: onnxruntime threads: "per_session" (default: each block graph's session has its own pool)
            or "shared" (ONNX Runtime's process-wide global pool: faster, most on small models, where a forward
            would wake a dozen idle pools; other code in the process must then create its sessions with
            ``use_per_session_threads = False``). See :mod:`elastic_compile.backends.onnxruntime`.
        memory_arena: onnxruntime CPU memory: "shared" (default: one arena registered with ONNX Runtime's
            environment for every graph of the process, so each graph's activations reuse the buffers the previous
            graph just freed, still in cache, and the runtime holds one set of them; sessions of other code are
            unaffected) or "per_session" (ONNX Runtime's default: an arena per graph).
        torch_threads: PyTorch intra-op threads during a call, for the parts outside the block graphs (restored
            after it). "auto" (default): 1 with onnxruntime (ONNX Runtime's threads still spin on the cores when
            a PyTorch op starts between two graphs, see :mod:`.torch_threads`), PyTorch's setting otherwise;
            None: PyTorch's setting always.
        routers: how routers run: "host" (default with onnxruntime: NumPy on the host, token means from the
            block graphs), "torch" (the PyTorch routers; default with tensorrt and torch) or "onnx"
            (routers/*.onnx). All three compute the same function (equal up to float32 rounding).
        free_torch_weights: drop the PyTorch copies of block weights (they run in the backend); each becomes
            a zero-stride tensor of the same shape, so FLOP profiling for ``stats`` still works. Default: True,
            except with ``other_shapes="torch"``, which needs them.
        other_shapes: a block call shaped unlike the export (another resolution or sequence length; batch sizes
            are always served): "error" (default) raises InputMismatchError, "torch" runs it with the block's
            PyTorch weights and warns once (see :class:`~.executor.OtherShapes`). ``runtime.exported_inputs``
            lists the shapes the graphs serve.
        check_hashes: verify every file against the manifest's sha256 first.
        device: where the PyTorch parts run (default CPU; CUDA for TensorRT).
        engine_cache: TensorRT engine cache directory (default ``<path>/engines``).
        outside_graphs: with onnxruntime, run the model's ops outside its blocks as the export's ``outside/``
            graphs (a :class:`~.driver.ModelDriver` becomes the model's forward) where the export has them;
            calls not shaped like the export's example (other than in batch size, where the graphs' batch is
            dynamic), and False, run them in PyTorch.
        providers: onnxruntime execution providers, in order (names or ``(name, options)`` pairs; default
            ``["CPUExecutionProvider"]``); with ``CUDAExecutionProvider`` (onnxruntime-gpu) the block graphs take
            and return CUDA tensors (pass ``device="cuda"`` for the PyTorch parts too).
        io_binding: onnxruntime inputs and outputs through IOBinding: "auto" (default: for tensors that are not
            on the CPU), "on" or "off" (NumPy views; CPU only). See :class:`~elastic_compile.backends.onnxruntime.OrtGraph`.
        cache: "auto" (default) serves the model with the feature cache its routers were trained for, as
            ``elastic_compile.load`` does (a plain sampling loop or ``runtime.sample`` uses it); "off" leaves it off.
    """
    if backend not in BACKENDS:
        raise ConfigError(f"backend in {BACKENDS}", repr(backend), "Use onnxruntime, tensorrt or torch.")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError("threads: None or an integer >= 1", repr(threads), "Use e.g. threads=2.")
    pinned_threads = resolve_torch_threads(torch_threads, backend)
    shapes = OtherShapes(other_shapes)
    if free_torch_weights is None:
        free_torch_weights = other_shapes != "torch"
    elif free_torch_weights and other_shapes == "torch":
        raise ConfigError("free_torch_weights=False with other_shapes='torch' (other shapes run on those weights)",
                          "free_torch_weights=True", "Leave free_torch_weights at its default.")
    if routers is None:
        routers = "host" if backend == "onnxruntime" else "torch"
    if routers not in ROUTER_MODES:
        raise ConfigError(f"routers in {ROUTER_MODES}", repr(routers), "Use 'host', 'torch' or 'onnx'.")
    if routers == "host" and backend == "tensorrt":
        raise ConfigError("routers='torch' with the TensorRT backend (routers run on the GPU)", "routers='host'",
                          "Use routers='torch'.")
    if backend == "tensorrt":
        available, why = tensorrt_available()
        if not available:
            raise BackendUnavailableError("TensorRT and a CUDA device", why,
                                          "Install TensorRT on a CUDA machine, or use backend='onnxruntime'.")
    root = Path(path)
    manifest = read_manifest(root, check_hashes=check_hashes)
    if base_model is not None and base_factory is not None:
        raise ConfigError("base_model or base_factory", "both", "Pass one of them.")
    base = load_base(root, manifest["source"]["base"], base_model if base_model is not None else base_factory)
    # Base files are hash-checked against the manifest; strict=False accepts a base fine-tuned before export.
    model = load_elastic(base, root / manifest["elastic"], strict=False, cache=cache)
    check_blocks(manifest, state_of(model), root / MANIFEST)
    model.eval().requires_grad_(False)
    if device is None and backend == "tensorrt":
        device = "cuda"
    if device is not None:
        model.to(device)
    if backend == "torch":
        return Runtime(model, manifest, root, backend, None, pinned_threads)
    if backend == "onnxruntime":
        engine = OnnxRuntimeBackend(threads, providers, thread_pool, memory_arena, io_binding)
    else:
        built_with = (manifest["backends"].get("tensorrt") or {}).get("flags") or {}
        options = {k: built_with[k] for k in ("optimization_level", "workspace_bytes") if built_with.get(k) is not None}
        options.update(trt_options or {})  # default: the flags the export prebuilt its engines with (cache hits)
        engine = TensorRTBackend(root, manifest, cache_dir=engine_cache, device=device, **options)
    state = state_of(model)
    summaries = PooledSummaries() if routers == "host" else None
    lookahead = LookaheadLogits() if routers == "host" else None
    for entry in manifest["blocks"]:
        gate = gate_of(state.blocks[entry["index"]])
        gate.original_forward = BlockExecutor(gate, entry, root, engine, manifest["dtype"], manifest["dense_bucket"],
                                              summaries, lookahead, shapes)
    looked_ahead = {int(e["lookahead"]["block"]) for e in manifest["blocks"] if e.get("lookahead")}
    driven = outside_graphs and backend == "onnxruntime" and manifest.get("program")
    if driven:  # graphs outside the blocks that compute the router of the block after them
        looked_ahead |= {int(s["lookahead"]["block"]) for s in manifest["program"]["steps"] if s.get("lookahead")}
    if routers == "onnx":
        for entry in manifest["routers"]:
            gate = gate_of(state.blocks[entry["block"]])
            gate.router = GraphRouter(engine.router_graph(root / entry["file"]), entry["inputs"],
                                      gate.router.num_widths, gate.router.num_actions)
    elif routers == "host":
        for entry in manifest["routers"]:
            gate = gate_of(state.blocks[entry["block"]])
            gate.router = HostRouter(gate.router, summaries, lookahead if entry["block"] in looked_ahead else None,
                                     entry["block"])
    elif backend == "onnxruntime":
        for entry in manifest["routers"]:
            gate = gate_of(state.blocks[entry["block"]])
            gate.router = SingleThreadRouter(gate.router)
    if driven:
        model.forward = ModelDriver(model, manifest["program"], manifest["blocks"], root, engine,
                                    fallback=model.forward, profiling=lambda: state.profiling, lookahead=lookahead)
    if free_torch_weights:
        free_block_weights(model, keep=manifest["runs_in_torch"]["block_parameters_used_outside"])
    return Runtime(model, manifest, root, backend, engine, pinned_threads)


def check_blocks(manifest: dict, state, file: Path) -> None:
    """The manifest's block and router entries name blocks of the elastic model it holds (same paths)."""
    specs = state.specs
    for k, entry in enumerate(manifest["blocks"]):
        index = entry["index"]
        if index >= len(specs) or specs[index].path != entry["path"]:
            raise ArtifactError(f"blocks[{k}] in {file} to name block {index} of its elastic model",
                                f"{entry['path']!r} (the model has {len(specs)} blocks)", "Export again.")
        ahead = entry.get("lookahead")
        if ahead and ahead["block"] not in state.routers:
            raise ArtifactError(f"blocks[{k}].lookahead in {file} to name a block with a router",
                                f"block {ahead['block']}", "Export again.")
    for k, entry in enumerate(manifest["routers"]):
        if entry["block"] not in state.routers:
            raise ArtifactError(f"routers[{k}] in {file} to name a block with a router", f"block {entry['block']}",
                                "Export again.")
    for k, step in enumerate((manifest.get("program") or {}).get("steps", ())):
        ahead = step.get("lookahead")
        if ahead and ahead["block"] not in state.routers:
            raise ArtifactError(f"program.steps[{k}].lookahead in {file} to name a block with a router",
                                f"block {ahead['block']}", "Export again.")


def free_block_weights(model: nn.Module, keep: Sequence[str] = ()) -> int:
    """Replace block parameters by zero-stride tensors of the same shape, dtype and device, except routers',
    those of modules outside the blocks (tied weights) and ``keep`` (parameter names that the export saw
    used outside the blocks' forwards). Returns the number of elements freed."""
    state = state_of(model)
    block_ids = {id(m) for block in state.blocks for m in block.modules()}
    outside = {id(p) for m in model.modules() if id(m) not in block_ids for p in m.parameters(recurse=False)}
    named = dict(model.named_parameters(remove_duplicate=False))
    outside.update(id(named[name]) for name in keep if name in named)
    freed = 0
    for block in state.blocks:
        for name, param in block.named_parameters():
            if name.startswith(ROUTER_ATTRIBUTE + ".") or id(param) in outside or param.stride() == (0,) * param.ndim:
                continue
            freed += param.numel()
            param.data = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)
    return freed

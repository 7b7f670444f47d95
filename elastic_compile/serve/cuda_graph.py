"""One CUDA graph for a whole elastic forward, routers deciding on the GPU (no device-to-host copy per block).

``capture_cuda_graph(model, example_inputs)`` warms the model up with every width bucket of every routed block,
then captures one forward under :func:`~elastic_compile.nn.gate.device.device_routing` in ``"graph"`` mode:
each block's buckets sit behind CUDA-graph IF nodes whose conditions the routers compute on the device. The
returned :class:`CapturedForward` replays it for new inputs of the same shapes (copied into the graph's static
input buffers) and returns the graph's static outputs; ``elastic_compile.stats(model)`` reads the decisions of
the last replay (one copy, only when asked).

With the feature cache on, one graph is captured per cache context (``cache_contexts``, e.g. ``("cond",
"uncond")`` for classifier-free guidance in two calls; default: the context active at capture) and a call replays
the graph of the context active then (``cache_context`` / ``ElasticCacheHooks`` set it, as for eager calls).
The cache's device buffers are updated in place by the graphs, so ``reset_cache`` between generations works.

Decisions pinned by ``elastic_compile.force`` around the capture are baked into the graph (that is how a dense
baseline graph is made); router weights are read by the graph at replay, so changing them in place is seen, but
replacing a parameter tensor (``load_state_dict`` keeps storage, ``.to()`` does not) needs a new capture.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..cache import cache_context
from ..capture.record import bind_to_signature
from ..errors import BackendUnavailableError, ConfigError, InputMismatchError
from ..nn.gate.device import DeviceRouting, check_supported, device_routing, require_conditional_nodes
from ..sampling import BRANCH_COND, BRANCH_COND_UNCOND, BRANCH_UNCOND, CFG_MODES
from ..state import describe_inputs, state_of


@dataclass
class CapturedGraph:
    """One captured forward: the graph (anything with ``replay()``), its output buffers and its decision log."""

    graph: Any
    outputs: Any
    routing: DeviceRouting


class CapturedForward:
    """A captured elastic forward: ``captured(*args, **kwargs)`` replays it on new inputs of the capture's shapes.

    ``graphs``: per feature-cache context (None without the cache). The outputs are the graph's own buffers,
    overwritten by the next replay (``clone_outputs=True`` returns copies). Not thread-safe: one replay at a time.
    """

    def __init__(self, model: nn.Module, graphs: dict[str | None, CapturedGraph], static_inputs: tuple,
                 clone_outputs: bool):
        self.model, self.graphs, self.static_inputs, self.clone_outputs = model, graphs, static_inputs, clone_outputs
        self.static_leaves, self.input_spec = pytree.tree_flatten(static_inputs)

    def __call__(self, *args, **kwargs):
        captured = self.graph_for_context()
        self.copy_inputs(args, kwargs)
        captured.graph.replay()
        state = state_of(self.model)
        state.last_inputs = describe_inputs(*self.static_inputs)
        state.pending_calls = captured.routing.calls
        if not self.clone_outputs:
            return captured.outputs
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, captured.outputs)

    def graph_for_context(self) -> CapturedGraph:
        cache = state_of(self.model).cache
        context = cache.context if cache is not None else None
        if context not in self.graphs:
            raise ConfigError(f"a call in one of the captured cache contexts {sorted(map(str, self.graphs))}",
                              f"context {context!r}", "Capture with cache_contexts=(...) listing every context the "
                              "sampler uses (ElasticCacheHooks: 'cond_uncond', or 'cond' and 'uncond').")
        return self.graphs[context]

    def copy_inputs(self, args: tuple, kwargs: dict) -> None:
        leaves, spec = pytree.tree_flatten(normalize_call(self.model, args, kwargs))
        if spec != self.input_spec:
            raise InputMismatchError(f"inputs structured as at capture ({self.input_spec})", f"{spec}",
                                     "Call with the same arguments as the example inputs, or capture again.")
        for index, (static, value) in enumerate(zip(self.static_leaves, leaves)):
            if isinstance(static, torch.Tensor):
                if not isinstance(value, torch.Tensor) or value.shape != static.shape or value.dtype != static.dtype:
                    found = (f"{tuple(value.shape)} {value.dtype}" if isinstance(value, torch.Tensor)
                             else type(value).__name__)
                    raise InputMismatchError(f"input {index} as {tuple(static.shape)} {static.dtype}", found,
                                             "A CUDA graph replays static shapes: capture one per input shape.")
                static.copy_(value, non_blocking=True)
            elif value != static:
                raise InputMismatchError(f"input {index} == {static!r} (baked into the graph)", repr(value),
                                         "Capture again for other non-tensor arguments.")


def normalize_call(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` as keyword arguments of ``model.forward`` where the signature names them, so a graph
    captured with ``model(**inputs)`` replays for ``model(x, timestep=t, ...)`` (how samplers call it)."""
    named = bind_to_signature(inspect.signature(model.forward), args, kwargs)
    if any(name.startswith("*") for name in named):  # *args in the signature: keep the call as it was made
        return tuple(args), dict(kwargs)
    return (), named


def capture_cuda_graph(model: nn.Module, example_inputs: Any, *, cache_contexts: Sequence[str] | None = None,
                       warmup: int = 2, pool=None, clone_outputs: bool = False,
                       fuse_decisions: bool = False) -> CapturedForward:
    """Capture one forward of the elastic ``model`` (on a CUDA device) with device-side routing.

    ``example_inputs``: a dict of keyword arguments or a tuple of positional ones, on the model's device; later
    calls (positional or by name, as ``model.forward`` accepts them) must match their shapes, dtypes and
    non-tensor values. A sampler with classifier-free guidance in one batch calls the model with twice the
    number of images: capture with that batch. ``cache_contexts``: with the feature cache on, the contexts to
    capture a graph for (default: the active one). ``pool``: a graph memory pool to share with other captures
    (``torch.cuda.graph_pool_handle()``). ``fuse_decisions``: compile each block's decision ops into one or two
    kernels (``device_routing.fused_decisions``). Raises ``BackendUnavailableError`` without a GPU or without
    conditional graph nodes; the feature cache's state is reset (warm-up runs touch it).
    """
    state = state_of(model)
    check_supported(state)
    require_conditional_nodes()
    args, kwargs = (tuple(example_inputs), {}) if isinstance(example_inputs, (tuple, list)) else ((), dict(example_inputs))
    static_inputs = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                                    normalize_call(model, args, kwargs))
    if any(isinstance(t, torch.Tensor) and not t.is_cuda for t in pytree.tree_leaves(static_inputs)):
        raise BackendUnavailableError("example inputs on a CUDA device", "a tensor on the CPU",
                                      "Move the model and its inputs to the GPU before capturing.")
    contexts = [None] if state.cache is None else list(cache_contexts or [state.cache.context])
    graphs = {}
    for context in contexts:
        with cache_context(model, context) if context is not None else contextlib.nullcontext():
            graphs[context] = _capture_one(model, static_inputs, warmup, pool, fuse_decisions)
    if state.cache is not None:
        state.cache.reset()
    return CapturedForward(model, graphs, static_inputs, clone_outputs)


def _capture_one(model: nn.Module, static_inputs: tuple, warmup: int, pool, fuse_decisions: bool) -> CapturedGraph:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(side):
        # every bucket's body runs once, so no kernel, cuBLAS handle, workspace or cache buffer is first created
        # mid-capture
        with device_routing(model, "every", fuse_decisions):
            for _ in range(warmup):
                model(*static_inputs[0], **static_inputs[1])
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), device_routing(model, "graph", fuse_decisions) as routing:
        with torch.cuda.graph(graph, pool=pool):
            outputs = model(*static_inputs[0], **static_inputs[1])
    return CapturedGraph(graph, outputs, routing)



def capture_for_sampling(model: nn.Module, scheduler: Any, config, num_images: int, *, cfg: str = "separate",
                         guidance_scale: float | None = None, device: str | torch.device = "cuda",
                         dtype: torch.dtype | None = None, **options) -> CapturedForward:
    """A :class:`CapturedForward` for the calls ``elastic_compile.sampling.sample`` makes to generate ``num_images``
    images with ``cfg`` and ``guidance_scale`` (default: the config's): its batch, dtypes, and with the feature
    cache on, one graph per context :class:`~elastic_compile.cache.ElasticCacheHooks` names."""
    inputs, contexts = sampling_calls(scheduler, config, num_images, cfg=cfg, guidance_scale=guidance_scale,
                                      device=device, dtype=dtype or next(model.parameters()).dtype)
    if state_of(model).cache is not None:
        options.setdefault("cache_contexts", contexts)
    return capture_cuda_graph(model, inputs, **options)


def sampling_calls(scheduler: Any, config, num_images: int, *, cfg: str, guidance_scale: float | None,
                   device, dtype: torch.dtype) -> tuple[dict, tuple[str, ...]]:
    """(example keyword inputs, cache contexts) of the denoiser calls of ``elastic_compile.sampling.sample``."""
    if cfg not in CFG_MODES:
        raise ConfigError(f"cfg in {CFG_MODES}", repr(cfg), "Use 'separate' (two calls per step) or 'batch'.")
    scale = config.guidance_scale if guidance_scale is None else float(guidance_scale)
    guided = scale != 1.0
    batch = 2 * num_images if guided and cfg == "batch" else num_images
    contexts = ((BRANCH_COND_UNCOND,) if cfg == "batch" else (BRANCH_COND, BRANCH_UNCOND)) if guided else (BRANCH_COND,)
    timesteps = copy.deepcopy(scheduler)
    timesteps.set_timesteps(config.num_inference_steps, device=device)
    inputs = dict(hidden_states=torch.zeros(batch, config.in_channels, config.sample_size, config.sample_size,
                                            device=device, dtype=dtype),
                  timestep=torch.zeros(batch, device=device, dtype=timesteps.timesteps.dtype),
                  class_labels=torch.zeros(batch, device=device, dtype=torch.long), return_dict=False)
    return inputs, contexts

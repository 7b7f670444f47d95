"""Device-side routing: decisions stay on the device, blocks branch on them without a device-to-host copy.

The default gate copies each router's logits to the host to choose what runs next; on a GPU that copy is a
synchronisation that drains the queue once per block (on an H200, 0.56x of dense for a 28-block DiT-XL at 256
tokens, batch 1, even with every block and router graph-captured: benchmarks/results/gpu_NVIDIA_H200.md). Under
:func:`device_routing` each gate instead computes its decisions as tensors and puts each width bucket behind a
device-evaluated condition (:class:`Branches`; at most one is true per block); what evaluates it is the mode:

* ``"graph"``: a CUDA-graph IF node (CUDA >= 12.4, ``torch.cuda.CUDAGraph.begin_capture_to_if_node``), so one
  graph of the whole forward replays with every decision taken on the GPU (:mod:`elastic_compile.serve.cuda_graph` captures it);
* ``"host"``: ``if bool(condition)`` (the same computation in eager mode; on CPU it costs nothing and is what the
  tests compare against the default gate);
* ``"every"``: every body runs (warm-up before a capture: every kernel of every bucket is initialised once).

Guarantees, per sample: the block output is the residual input when its router skips it and the output of the
block at the chosen bucket when it runs, as with the default gate (to float rounding). A block runs once, on the
whole batch, at the widest bucket any running sample chose, with each sample's FFN units past its own bucket
zeroed before the out-projection (units are ordered and buckets keep prefixes, so that *is* the narrower FFN);
rows of skipped samples are computed and discarded. So a batch costs its widest decision per block (the default
gate runs sub-batches instead, which needs the host): with batch 1, or samples that agree, exactly the chosen
bucket runs. Measured on the reference model's trained routers (budget 0.5, block FLOPs over a generation of 8
images): decisions 0.54 of dense, executed 0.71 with classifier-free guidance in one batch of 16, 0.62 with
``cfg="separate"`` (batches of 8), 0.59 for one image (batch 2). ``elastic_compile.stats`` counts that work in
``executed_flops_fraction`` and the decisions' own cost in ``decided_flops_fraction``.

The feature cache (``elastic_compile/cache``) works here too, with the same rules on device tensors (reuse counters,
band, fallback): its per-(context, block, batch) deltas live in buffers updated in place
(``FeatureCacheState.device_entries``), so ``reset_cache`` reaches a captured graph's state. Not supported (a
typed error): skippable blocks with tensor outputs that are not residual streams.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ...errors import BackendUnavailableError, ConfigError
from ...state import BlockCall, ElasticState, state_of
from .decisions import device_decisions, fused_decisions

BRANCH_MODES = ("graph", "host", "every")


def conditional_nodes_available() -> bool:
    """Whether this PyTorch can put code behind a CUDA-graph IF node (needs a CUDA build, CUDA >= 12.4)."""
    return (torch.cuda.is_available() and torch.version.cuda is not None
            and all(hasattr(torch.cuda.CUDAGraph, name) for name in
                    ("begin_capture_to_if_node", "end_capture_to_conditional_node", "get_currently_capturing_graph"))
            and tuple(int(p) for p in torch.version.cuda.split(".")[:2]) >= (12, 4))


def require_conditional_nodes() -> None:
    """``BackendUnavailableError`` unless :func:`conditional_nodes_available`."""
    if not conditional_nodes_available():
        raise BackendUnavailableError("a CUDA GPU and PyTorch with conditional CUDA-graph nodes (CUDA >= 12.4)",
                                      f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
                                      f"GPU {'present' if torch.cuda.is_available() else 'absent'}",
                                      "Run on a GPU machine with a CUDA build of PyTorch 2.11 or later, or use the "
                                      "default host-routed execution.")


class Branches:
    """Runs ``body()`` when a device-side boolean scalar is true, the way ``mode`` says (see module doc)."""

    def __init__(self, mode: str):
        if mode not in BRANCH_MODES:
            raise ConfigError(f"a branch mode among {BRANCH_MODES}", repr(mode), "Use 'graph' inside a CUDA-graph "
                              "capture, 'host' for eager execution.")
        self.mode = mode

    def run_if(self, condition: torch.Tensor, body) -> None:
        if self.mode == "every":
            body()
        elif self.mode == "host":
            if bool(condition):
                body()
        else:
            graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
            graph.begin_capture_to_if_node(condition)
            try:
                body()
            finally:
                graph.end_capture_to_conditional_node()


@dataclass
class DeviceRouting:
    """Installed on an :class:`~elastic_compile.state.ElasticState` while gates route on the device.

    ``log``: per block call, ``(block, run, bucket, router_ran, reused)`` where ``run``/``bucket``/``reused`` are
    device tensors (refreshed by every replay of a captured graph) or host lists (decisions pinned by ``force``).
    """

    branches: Branches
    log: list = field(default_factory=list)
    decide: Callable = device_decisions  # or its compiled form (fused_decisions)

    def calls(self) -> list[BlockCall]:
        """The logged decisions as host records (one device-to-host copy for the whole forward)."""
        tensors = [t for entry in self.log for t in entry[1:] if isinstance(t, torch.Tensor)]
        host = iter(torch.cat([t.reshape(-1).long() for t in tensors]).tolist()) if tensors else iter(())

        def listed(value, kind):
            return [kind(next(host)) for _ in range(value.numel())] if isinstance(value, torch.Tensor) else value
        calls = []
        for block, run, bucket, router_ran, reused in self.log:
            run, bucket, reused = listed(run, bool), listed(bucket, int), listed(reused, bool)
            calls.append(BlockCall(block, run, bucket, router_ran, reused, batched=True))
        return calls


def check_supported(state: ElasticState) -> None:
    if state.soft:
        raise ConfigError("hard decisions for device routing", "soft decisions (router training in progress)",
                          "Route on the device only at inference.")


@contextlib.contextmanager
def device_routing(model: nn.Module, mode: str = "host", fuse_decisions: bool = False):
    """Inside the ``with`` block, every gate of ``model`` decides on the device and branches with ``mode``;
    ``fuse_decisions`` compiles the decision function (:func:`fused_decisions`).

    Yields the :class:`DeviceRouting` whose ``log`` collects each forward's decisions (reset when a forward
    starts); ``elastic_compile.stats`` copies them to the host when asked, also after the ``with`` block.
    """
    state = state_of(model)
    check_supported(state)
    if mode == "graph":
        require_conditional_nodes()
    previous = state.device_routing
    routing = DeviceRouting(Branches(mode), decide=fused_decisions() if fuse_decisions else device_decisions)
    state.device_routing = routing
    try:
        yield routing
    finally:
        state.device_routing = previous

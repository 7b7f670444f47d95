import contextlib

import torch
from torch.utils import _pytree as pytree

import elastic_compile as ec
from elastic_compile.state import state_of


def randomize_routers(model, seed=0, scale=3.0):
    """Give every router random output weights, so decisions differ between samples."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in state_of(model).routers.values():
            router.fc1.weight.copy_(torch.randn(router.fc1.weight.shape, generator=generator))
            router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=generator) * scale)
            router.fc2.bias.copy_(torch.randn(router.fc2.bias.shape, generator=generator))


def plans(model):
    """The last forward's decisions: per block, (run, width) of each sample."""
    return [[(d.run, d.width) for d in block] for block in ec.stats(model).decisions]


def mixed_routers(model, inputs, fully_skipped_block=False):
    """Random routers under which some samples skip and some block runs samples at different widths (so the
    per-sample masks and the row merge are exercised); with ``fully_skipped_block`` also some block that every
    sample skips. Returns the decisions."""
    for seed in range(20):
        randomize_routers(model, seed=seed)
        with torch.no_grad():
            model(**inputs)
        decided = plans(model)
        widths_differ = any(len({w for r, w in block if r}) > 1 for block in decided)
        partly_skipped = any(not r for block in decided for r, _ in block)
        all_skip_some_block = any(not any(r for r, _ in block) for block in decided)
        if widths_differ and partly_skipped and (all_skip_some_block or not fully_skipped_block):
            return decided
    raise AssertionError("no seed gave mixed decisions")


def sample_inputs(inputs, index, batch):
    """The inputs of one sample of a batch (tensors with the batch as leading dim; per-sample lists)."""
    out = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            out[key] = value[index:index + 1]
        elif isinstance(value, list) and len(value) == batch:
            out[key] = value[index:index + 1]
        else:
            out[key] = value
    return out


class EagerStandInGraph:
    """Test double of a captured CUDA graph: ``replay`` recomputes the forward from the static inputs into the
    static outputs, with the routing the capture installed (what a CUDA graph's replay does, minus the GPU)."""

    def __init__(self, model, static_inputs, routing):
        self.model, self.static_inputs, self.routing = model, static_inputs, routing
        with torch.no_grad():
            self.outputs = self.forward()

    def forward(self):
        state = state_of(self.model)
        previous, state.device_routing = state.device_routing, self.routing
        try:
            with torch.no_grad():
                return self.model(*self.static_inputs[0], **self.static_inputs[1])
        finally:
            state.device_routing = previous

    def replay(self):
        for static, fresh in zip(pytree.tree_leaves(self.outputs), pytree.tree_leaves(self.forward())):
            if isinstance(static, torch.Tensor):
                static.copy_(fresh)


def stand_in_capture(model, inputs, clone_outputs=True, contexts=(None,)):
    """What ``capture_cuda_graph`` builds, with :class:`EagerStandInGraph` in place of each CUDA graph."""
    from elastic_compile.cache import cache_context
    from elastic_compile.serve.cuda_graph import CapturedForward, CapturedGraph, normalize_call
    from elastic_compile.nn.gate.device import Branches, DeviceRouting
    static = pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t,
                             normalize_call(model, (), dict(inputs)))
    graphs = {}
    for context in contexts:
        routing = DeviceRouting(Branches("host"))
        with cache_context(model, context) if context is not None else contextlib.nullcontext():
            graph = EagerStandInGraph(model, static, routing)
        graphs[context] = CapturedGraph(graph, graph.outputs, routing)
    if state_of(model).cache is not None:
        state_of(model).cache.reset()
    return CapturedForward(model, graphs, static, clone_outputs=clone_outputs)


def reference_case():
    """The bundled reference model (with its sampler) and a batch of 4 inputs at four noise levels; skips the
    test when the model's assets are not there."""
    import pytest
    from elastic_compile.reference import ASSETS_DIR, load_reference
    if not (ASSETS_DIR / "transformer" / "config.json").is_file():
        pytest.skip("reference model assets are not there yet")
    model, scheduler, config = load_reference()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(4, 1, 8, 8, generator=g), timestep=torch.tensor([50.0, 300.0, 600.0, 950.0]),
                  class_labels=torch.tensor([1, 5, 10, 7]), return_dict=False)
    return model, inputs, scheduler, config

"""RouterStack: routers of one model share per-forward work (one weights check, one GEMM per shared tensor)."""
import pytest
import torch

import elastic_compile as ec
from elastic_compile.nn.router import Router
from elastic_compile.nn.router_stack import RouterStack
from elastic_compile.runtime.state import state_of
from helpers import randomize_routers
from zoo import ARCHITECTURES, first_output


def _block_arguments(model, inputs):
    """Per routed block: its router and the arguments it was called with in one real forward."""
    state, recorded = state_of(model), {}

    def keep(index):
        def hook(module, args, kwargs):
            recorded.setdefault(index, state.blocks[index]._elastic_gate.bind(args, kwargs))
        return hook
    hooks = [block.register_forward_pre_hook(keep(i), with_kwargs=True) for i, block in enumerate(state.blocks)]
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return [(state.routers[i], recorded[i]) for i in sorted(state.routers)]


def _decisions_and_output(model, inputs):
    with torch.no_grad():
        out = first_output(model(**inputs))
    return [[(d.run, d.width) for d in block] for block in ec.stats(model).decisions], out


@pytest.mark.parametrize("name", ["reference_dit", "dit", "flux", "sd3"])
def test_stacked_logits_equal_each_router_alone(name):
    model, inputs = ARCHITECTURES[name](batch=3)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=1)
    calls = _block_arguments(model, inputs)
    stack = state_of(model).router_stack
    stack.begin_forward()
    with torch.no_grad():
        for router, arguments in calls:
            expected = router.plain_logits(arguments)
            torch.testing.assert_close(router.logits(arguments, stack), expected, atol=1e-4, rtol=1e-4)
            assert stack.start(router, arguments) is not None  # served by the stack, not the router's own path
    shared = [key for key in stack.stacks]
    assert shared, "every zoo model has a conditioning vector or timestep read by all routers"
    assert all(len(stack.stacks[key].sizes) > 1 for key in shared)


@pytest.mark.parametrize("name", ["reference_dit", "flux"])
def test_model_decisions_and_outputs_equal_without_the_stack(name):
    model, inputs = ARCHITECTURES[name](batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=2)
    with_stack = _decisions_and_output(model, inputs)
    state = state_of(model)
    stack, state.router_stack = state.router_stack, None
    try:
        without = _decisions_and_output(model, inputs)
    finally:
        state.router_stack = stack
    assert with_stack[0] == without[0]
    assert len({d for block in with_stack[0] for d in block}) > 1  # decisions vary: the comparison means something
    torch.testing.assert_close(with_stack[1], without[1])


def test_one_product_per_shared_tensor_per_forward(monkeypatch):
    model, inputs = ARCHITECTURES["dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    stack, products = state_of(model).router_stack, []
    original = RouterStack._products
    monkeypatch.setattr(RouterStack, "_products", lambda self, *a: products.append(a[1]) or original(self, *a))
    with torch.no_grad():
        for _ in range(3):  # new input tensors each time, as a sampler's steps
            model(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()})
        assert len(state_of(model).routers) > 1
        assert len(products) == 3 * len(stack.stacks)  # each forward: once per shared feature, not once per router
        model(**inputs)
        model(**inputs)  # the very tensors again, unmodified: served as they are (weights checked this forward)
    assert len(products) == 3 * len(stack.stacks) + len(stack.stacks)


def test_parameters_changed_between_forwards_are_used():
    model, inputs = ARCHITECTURES["reference_dit"](batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    first = _decisions_and_output(model, inputs)[0]
    randomize_routers(model, seed=4)  # in place, as an optimizer step or load_state_dict would
    second = _decisions_and_output(model, inputs)[0]
    stack = state_of(model).router_stack
    state_of(model).router_stack = None
    assert second == _decisions_and_output(model, inputs)[0]
    assert first != second
    state_of(model).router_stack = stack
    for router in state_of(model).routers.values():
        router.reset_to_full_capacity()
    decisions = _decisions_and_output(model, inputs)[0]
    assert all(d == (True, 1.0) for block in decisions for d in block)


def test_a_shared_tensor_changed_in_place_or_replaced_is_recomputed():
    model, inputs = ARCHITECTURES["dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=5)
    (router, arguments), (other, other_arguments) = _block_arguments(model, inputs)[:2]
    stack = state_of(model).router_stack
    name = next(f.name for f in router.features if f.kind in ("vector", "scalar"))
    with torch.no_grad():
        stack.begin_forward()
        router.logits(arguments, stack)
        arguments[name].add_(7)  # same tensor, new version
        torch.testing.assert_close(router.logits(arguments, stack), router.plain_logits(arguments),
                                   atol=1e-4, rtol=1e-4)
        replaced = dict(other_arguments, **{name: arguments[name] + 1})  # equal identity never assumed
        torch.testing.assert_close(other.logits(replaced, stack), other.plain_logits(replaced), atol=1e-4, rtol=1e-4)


class PerBlockConditioningDiT(torch.nn.Module):
    """The hand-written DiT whose blocks each get their own conditioning tensor (``c`` scaled per block)."""

    def __init__(self):
        super().__init__()
        from elastic_compile.models.dit import DiT
        self.dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)

    def forward(self, x, t, y):
        dit = self.dit
        tokens = dit.x_embedder(x).flatten(2).transpose(1, 2) + dit.pos_embed
        c = dit.t_embedder(t) + dit.y_embedder(y)
        for index, block in enumerate(dit.blocks):
            tokens = block(tokens, c * (1.0 + index))
        shift, scale = dit.final_modulation(c).chunk(2, dim=1)
        tokens = dit.final_linear(dit.final_norm(tokens) * (1 + scale[:, None]) + shift[:, None])
        return dit._unpatchify(tokens)


def test_blocks_with_their_own_conditioning_tensors():
    torch.manual_seed(0)
    model = PerBlockConditioningDiT().eval()
    inputs = dict(x=torch.randn(3, 4, 8, 8), t=torch.rand(3) * 1000, y=torch.randint(0, 10, (3,)))
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=6)
    for router, arguments in _block_arguments(model, inputs):
        stack = state_of(model).router_stack
        stack.begin_forward()
        with torch.no_grad():
            torch.testing.assert_close(router.logits(arguments, stack), router.plain_logits(arguments),
                                       atol=1e-4, rtol=1e-4)
    with_stack = _decisions_and_output(model, inputs)
    state_of(model).router_stack = None
    assert with_stack[0] == _decisions_and_output(model, inputs)[0]


def test_unknown_routers_and_calls_outside_a_forward_use_their_own_path():
    model, inputs = ARCHITECTURES["dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    state = state_of(model)
    router, arguments = _block_arguments(model, inputs)[0]
    stranger = Router(router.features, router.fc1.out_features, router.num_widths).eval()
    stranger.load_state_dict(router.state_dict())
    state.router_stack.begin_forward()
    assert state.router_stack.start(stranger, arguments) is None
    with torch.no_grad():
        torch.testing.assert_close(stranger.logits(arguments, state.router_stack), router.plain_logits(arguments),
                                   atol=1e-4, rtol=1e-4)
    assert not state.in_forward
    with pytest.raises(Exception):
        model(x=inputs["x"][:, :1], t=inputs["t"], y=inputs["y"])  # wrong channel count: the forward raises
    assert not state.in_forward  # the post-hook ran anyway: later direct block calls use the routers' own path

"""The host gate's decision memo for routers that read the timestep only (nn/decision_memo.py)."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.nn.decision_memo import DecisionMemo
from elastic_compile.nn.gate.host import routed_decisions
from elastic_compile.nn.router import Router
from elastic_compile.state import state_of
from elastic_compile.train.schedule_routers import set_action
from zoo import ARCHITECTURES


def elastic():
    model, inputs = ARCHITECTURES["dit"](batch=4)
    return ec.transform(model, ec.ElasticConfig(skip_actions=("reuse", "forecast2")), example_inputs=inputs), inputs


def timestep_only(router: Router, seed: int) -> None:
    """Random weights on the timestep feature, zero on every other one (what fit_schedule_routers leaves)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        start = 0
        for feature in router.features:
            block = router.fc1.weight[:, start:start + feature.dim]
            if feature.kind == "scalar":
                block.copy_(torch.randn(block.shape, generator=generator))
            else:
                block.zero_()
            start += feature.dim
        router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=generator))
        router.fc2.bias.copy_(torch.randn(router.fc2.bias.shape, generator=generator))


def fresh(router, arguments, threshold):
    """The decisions computed from the router's logits, bypassing any memo."""
    memo_of = router.decision_memo
    router.decision_memo = lambda: None
    try:
        return routed_decisions(router, arguments, threshold)
    finally:
        del router.decision_memo
        assert router.decision_memo == memo_of


@settings(max_examples=25, deadline=None)
@given(timesteps=st.lists(st.floats(0.0, 1000.0, allow_nan=False), min_size=4, max_size=4),
       threshold=st.sampled_from([0.3, 0.5, 0.7]), seed=st.integers(0, 50))
def test_served_decisions_equal_the_routers_own(timesteps, threshold, seed):
    """Per sample, a memo hit returns what the router decides for those timesteps now (asked twice: the second
    answer comes from the memo)."""
    model, inputs = elastic()
    router = state_of(model).routers[0]
    timestep_only(router, seed)
    arguments = dict(hidden_states=inputs["hidden_states"], timestep=torch.tensor(timesteps),
                     class_labels=inputs["class_labels"])
    with torch.no_grad():
        memo = router.decision_memo()
        assert memo is not None
        first = routed_decisions(router, arguments, threshold)
        again = routed_decisions(router, dict(arguments, timestep=torch.tensor(timesteps)), threshold)
        assert memo.hits == 1
        assert first == again == fresh(router, arguments, threshold)


def test_a_weight_change_or_another_threshold_is_never_served_a_stale_decision():
    model, inputs = elastic()
    router = state_of(model).routers[0]
    timestep_only(router, 0)
    arguments = dict(hidden_states=inputs["hidden_states"], timestep=torch.full((4,), 500.0),
                     class_labels=inputs["class_labels"])
    with torch.no_grad():
        routed_decisions(router, arguments, 0.5)
        router.fc2.bias[0] = 30.0  # in place: every sample runs now
        run, _, _, _ = routed_decisions(router, arguments, 0.5)
        assert run == [True] * 4
        router.fc2.bias[0] = -30.0
        assert routed_decisions(router, arguments, 0.5)[0] == [False] * 4
        assert routed_decisions(router, arguments, 0.0)[0] == [True] * 4  # p >= 0 always


def test_only_routers_reading_scalars_alone_have_a_memo():
    model, inputs = elastic()
    router = state_of(model).routers[0]
    with torch.no_grad():
        assert router.decision_memo() is None  # as transformed: reads the token stream and the labels too
        timestep_only(router, 1)
        assert isinstance(router.decision_memo(), DecisionMemo)
        router.logits = lambda arguments: Router.logits(router, arguments)  # shadowed (a recorder): no memo
        assert router.decision_memo() is None
        del router.logits
    assert router.decision_memo() is None  # gradients on: the training path, no memo


def test_schedule_routers_serve_the_same_images_with_and_without_the_memo():
    """A served generation whose decisions come from the memo (second generation) equals the first, and the
    same model with the memo switched off."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
    from elastic_compile.sampling import SamplingConfig, sample
    config = SamplingConfig(num_inference_steps=6, guidance_scale=2.0, sample_size=8, in_channels=4,
                            num_classes=10, null_class=10)
    model, _ = elastic()
    routers = state_of(model).routers
    for index, router in routers.items():
        timestep_only(router, index)
        set_action(router, 1)
    apply_feature_cache(model, FeatureCacheConfig(max_reuse=2, fallback="run"))
    hooks = ElasticCacheHooks(model)

    def generate():
        return sample(model, FlowMatchEulerDiscreteScheduler(), [1, 4, 7], config, seed=3, hooks=hooks)

    first, second = generate(), generate()
    assert all(router.folded()["decisions"].hits > 0 for router in routers.values())
    for router in routers.values():
        router.decision_memo = lambda: None
    without = generate()
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(without, first, rtol=0, atol=0)
    with ec.force(model, skip=False, width=1.0):
        dense = generate()
    assert (dense - first).abs().max() > 1e-3  # the routers did skip: the decisions served mattered


@pytest.mark.parametrize("bad", [torch.zeros(5000), "500"])
def test_values_not_worth_keying_give_no_key(bad):
    memo = DecisionMemo(read=[type("F", (), dict(name="timestep", kind="scalar"))()], unread=[], rows_of=None)
    assert memo.key(dict(timestep=bad), 0.5) is None


def test_the_runtimes_host_router_keeps_its_own_memo():
    """The NumPy host router (what ONNX Runtime serving runs between block graphs) memoises the same way, with
    its own entries (its float32 arithmetic may round differently from the PyTorch router's)."""
    from elastic_compile.serve.host_router import HostRouter
    model, inputs = elastic()
    router = state_of(model).routers[0]
    timestep_only(router, 3)
    host = HostRouter(router)
    arguments = dict(hidden_states=inputs["hidden_states"], timestep=torch.tensor([10.0, 10.0, 900.0, 900.0]),
                     class_labels=inputs["class_labels"])
    with torch.no_grad():
        memo = host.decision_memo()
        assert memo is not None and memo is not router.decision_memo()
        first = routed_decisions(host, arguments, 0.5)
        assert routed_decisions(host, dict(arguments), 0.5) == first and memo.hits == 1
        assert first == fresh(host, arguments, 0.5)
        router.fc2.bias[0] += 50.0  # a change to the PyTorch router: the host router refolds, memo included
        assert host.decision_memo() is not memo
        assert routed_decisions(host, arguments, 0.5)[0] == [True] * 4

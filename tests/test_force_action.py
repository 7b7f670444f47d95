"""``ec.force(..., action=...)``: pinning the skip action a skipped sample's stand-in takes (state.py)."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import elastic_compile as ec
from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
from elastic_compile.errors import ConfigError
from elastic_compile.nn.gate.device import device_routing
from elastic_compile.sampling import SamplingConfig, sample
from zoo import ARCHITECTURES

CONFIG = SamplingConfig(num_inference_steps=6, guidance_scale=2.0, sample_size=8, in_channels=4, num_classes=10,
                        null_class=10)


def cached(skip_actions):
    model, inputs = ARCHITECTURES["dit"](batch=4)
    model = ec.transform(model, ec.ElasticConfig(width_buckets=(1.0,), skip_actions=skip_actions),
                         example_inputs=inputs)
    apply_feature_cache(model, FeatureCacheConfig(max_reuse=2, fallback="run"))
    return model


def generate(model, action=None, routing=None):
    """Every block asks to skip (the router-free block cache) with ``action`` pinned."""
    hooks = ElasticCacheHooks(model)

    def denoiser(*args, **kwargs):
        with ec.force(model, skip=True, width=1.0, action=action):
            if routing is None:
                return model(*args, **kwargs)
            with device_routing(model, routing):
                return model(*args, **kwargs)

    denoiser.parameters = model.parameters
    with torch.no_grad():
        return sample(denoiser, FlowMatchEulerDiscreteScheduler(), [1, 4, 7], CONFIG, seed=2, hooks=hooks)


@pytest.mark.parametrize("routing", [None, "host"])
@pytest.mark.parametrize("action", ["reuse", "forecast2"])
def test_a_pinned_action_equals_a_model_with_that_action_alone(action, routing):
    """Host gate and device routing alike: a model with several skip actions, one pinned, generates what a model
    with only that action does (the weights are the same: untrained routers, same base)."""
    both = generate(cached(("reuse", "forecast2")), action, routing)
    alone = generate(cached((action,)), None, routing)
    torch.testing.assert_close(both, alone, rtol=0, atol=1e-6)


def test_actions_pinned_per_block():
    """``{block: action}``: the listed blocks take theirs, the others the first action; different from either
    action everywhere."""
    model = cached(("reuse", "forecast2"))
    mixed = generate(model, {0: "forecast2", 2: "forecast2"})
    assert (mixed - generate(model, "reuse")).abs().max() > 1e-5
    assert (mixed - generate(model, "forecast2")).abs().max() > 1e-5
    torch.testing.assert_close(mixed, generate(model, {0: "forecast2", 2: "forecast2", 1: "reuse"}), rtol=0, atol=0)


def test_unknown_actions_and_blocks_are_refused():
    model = cached(("reuse", "forecast2"))
    with pytest.raises(ConfigError, match="skip action"):
        with ec.force(model, skip=True, action="forecast"):
            pass
    with pytest.raises(ConfigError, match="block indices"):
        with ec.force(model, skip=True, action={99: "reuse"}):
            pass

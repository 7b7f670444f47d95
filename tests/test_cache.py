"""Block feature cache: semantics, resets, per-sample and per-branch isolation (issue 5)."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.cache import (CacheContextError, ElasticCacheHooks, FeatureCacheConfig,
                                           apply_feature_cache, cache_context, reset_cache)
from elastic_compile.sampling import SamplingConfig, sample
from elastic_compile.state import state_of
from helpers import randomize_routers
from zoo import ARCHITECTURES


def _block_io(model, index):
    """Record (input, output) hidden states of block ``index`` on each call."""
    seen = []
    block = state_of(model).blocks[index]
    block.register_forward_hook(lambda m, a, k, out: seen.append((k.get("x", a[0] if a else None), out)), with_kwargs=True)
    return seen


def _model(**cache):
    model, inputs = ARCHITECTURES["reference_dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    if cache is not None:
        apply_feature_cache(model, FeatureCacheConfig(**cache))
    return model, inputs


def _call(model, inputs, context="cond", **plan):
    with torch.no_grad(), cache_context(model, context), ec.force(model, **plan):
        return model(**inputs)


def test_skipped_block_returns_input_plus_delta_of_its_last_run():
    model, inputs = _model(max_reuse=2)
    seen = _block_io(model, 1)
    _call(model, inputs, skip=False, width=1.0)
    x1, y1 = seen[-1]
    second = {**inputs, "x": inputs["x"] * 0.5}
    _call(model, second, skip={1}, width=1.0)
    x2, y2 = seen[-1]
    torch.testing.assert_close(y2, x2 + (y1 - x1))
    assert [d.reused for d in ec.stats(model).decisions[1]] == [True, True]
    assert all(not d.run for d in ec.stats(model).decisions[1])


def test_step_stats_describe_the_whole_generation_not_its_last_step():
    """Skips forced, a cache that falls back to running (what cache-aware routers are served with): a block runs
    once every K + 1 steps, so the last step alone can show nothing skipped while the generation skipped most."""
    from elastic_compile.stats import StepStats
    model, inputs = _model(max_reuse=2, fallback="run")
    steps = StepStats(model)
    for step in range(6):
        _call(model, inputs, skip=True)
        steps(step, None)
    per_step = [s.skipped_fraction for s in steps.steps]
    assert per_step[0] == 0 and per_step[1] == per_step[2] > 0 and per_step[3] == 0 and per_step[-1] > 0
    assert steps.skipped_fraction == pytest.approx(sum(per_step) / 6) and steps.skipped_fraction > 0
    assert steps.reused_fraction == steps.skipped_fraction  # every skip was served from the cache
    assert steps.executed_flops_fraction < 1.0


def test_reuse_limit_then_identity_and_rerun_refreshes():
    model, inputs = _model(max_reuse=2)
    seen = _block_io(model, 0)
    _call(model, inputs, skip=False)
    for expected_reuse in (True, True, False):
        _call(model, inputs, skip={0})
        x, y = seen[-1]
        assert ec.stats(model).decisions[0][0].reused == expected_reuse
        if not expected_reuse:
            assert torch.equal(y, x)
    _call(model, inputs, skip=False)
    _call(model, inputs, skip={0})
    assert ec.stats(model).decisions[0][0].reused


def test_fallback_run_turns_every_unusable_skip_into_a_run():
    model, inputs = _model(max_reuse=2, fallback="run")
    seen = _block_io(model, 0)
    expected = [(True, False), (False, True), (False, True), (True, False), (False, True)]  # run, K reuses, run...
    for run, reused in expected:
        _call(model, inputs, skip=True, width=1.0)
        x, y = seen[-1]
        assert not torch.equal(y, x)  # never the identity skip
        decision = ec.stats(model).decisions[0][0]
        assert (decision.run, decision.reused) == (run, reused)
    fraction = ec.stats(model).executed_flops_fraction
    assert 0.0 < fraction < 0.5  # a reuse step runs no block at all
    with pytest.raises(ConfigError, match="fallback"):
        FeatureCacheConfig(fallback="skip")


@pytest.mark.parametrize("min_points, expected", [
    (2, [True, True, False, True, False, True]),     # a forecast waits for a slope: run, run, forecast, run, ...
    (1, [True, False, True, False, True, False]),    # the old rule: a forecast from one update is a plain reuse
])
def test_a_forecast_never_stands_in_from_a_single_update(min_points, expected):
    model, inputs = ARCHITECTURES["reference_dit"](batch=2)
    ec.transform(model, ec.ElasticConfig(skip_actions=("forecast",)), example_inputs=inputs)
    apply_feature_cache(model, FeatureCacheConfig(max_reuse=1, fallback="run", forecast_min_points=min_points))
    runs = []
    for step in range(len(expected)):
        _call(model, {**inputs, "t": inputs["t"] - step}, skip=True, width=1.0)
        runs.append(ec.stats(model).decisions[0][0].run)
    assert runs == expected
    with pytest.raises(ConfigError, match="forecast_min_points"):
        FeatureCacheConfig(forecast_min_points=3)


def test_a_recorded_cache_without_forecast_min_points_is_served_as_it_was_trained():
    from elastic_compile.cache.context import serving_cache_config
    assert serving_cache_config({"feature_cache": {"max_reuse": 2, "fallback": "run"}}).forecast_min_points == 1
    assert serving_cache_config({}).forecast_min_points == 2


def test_cache_off_and_after_reset_skip_is_identity():
    model, inputs = _model(max_reuse=3)
    seen = _block_io(model, 2)
    _call(model, inputs, skip=False)
    reset_cache(model)
    _call(model, inputs, skip={2})
    x, y = seen[-1]
    assert torch.equal(y, x)
    ec.cache.remove_feature_cache(model)
    with torch.no_grad(), ec.force(model, skip={2}):
        model(**inputs)  # no context needed without a cache
    x, y = seen[-1]
    assert torch.equal(y, x)


def test_contexts_keep_branches_apart_and_a_context_is_required():
    model, inputs = _model()
    seen = _block_io(model, 1)
    _call(model, inputs, context="cond", skip=False)
    _call(model, inputs, context="uncond", skip={1})  # nothing cached for this branch yet
    x, y = seen[-1]
    assert torch.equal(y, x)
    with pytest.raises(CacheContextError):
        with torch.no_grad():
            model(**inputs)


def test_band_rule_reuses_only_marginal_runs():
    model, inputs = _model(band=0.2)
    router = state_of(model).routers[1]
    with torch.no_grad():
        _call(model, inputs)  # untrained routers run everything (p ~ 0.98): deltas stored
        router.fc2.bias[0] = 0.4  # p = sigmoid(0.4) ~ 0.60: runs, inside [0.5, 0.7): reuse instead
        _call(model, inputs)
        assert [(d.run, d.reused) for d in ec.stats(model).decisions[1]] == [(False, True)] * 2
        router.fc2.bias[0] = -2.0  # p ~ 0.12 < tau: identity skip under the band rule
        _call(model, inputs)
        assert [(d.run, d.reused) for d in ec.stats(model).decisions[1]] == [(False, False)] * 2


def _sampling_setup():
    model, inputs = ARCHITECTURES["dit"](batch=4)
    ec.transform(model, example_inputs=inputs)
    apply_feature_cache(model, FeatureCacheConfig(max_reuse=2))
    config = SamplingConfig(num_inference_steps=8, guidance_scale=3.0, sample_size=8, in_channels=4, num_classes=10,
                            null_class=10)
    return model, FlowMatchEulerDiscreteScheduler(), config


def test_batch_of_four_equals_four_single_generations_with_cache():
    model, scheduler, config = _sampling_setup()
    randomize_routers(model, seed=4)
    labels = [1, 7, 3, 3]
    hooks = ElasticCacheHooks(model)
    reused = []
    batched = sample(model, scheduler, labels, config, seeds=[10, 11, 12, 13], hooks=hooks,
                     on_step_end=lambda step, x: reused.append(
                         sum(d.reused for block in ec.stats(model).decisions for d in block)))
    reused = sum(reused)
    for i, label in enumerate(labels):
        single = sample(model, scheduler, [label], config, seeds=[10 + i], hooks=hooks)
        torch.testing.assert_close(batched[i:i + 1], single, atol=1e-5, rtol=1e-5)
    assert reused > 0


def test_cfg_as_one_batch_equals_cfg_as_two_calls_with_cache():
    model, scheduler, config = _sampling_setup()
    randomize_routers(model, seed=6)
    hooks = ElasticCacheHooks(model)
    reused = []
    one = sample(model, scheduler, [2, 5], config, seed=3, cfg="batch", hooks=hooks, on_step_end=lambda step, x:
                 reused.append(sum(d.reused for block in ec.stats(model).decisions for d in block)))
    assert sum(reused) > 0
    two = sample(model, scheduler, [2, 5], config, seed=3, cfg="separate", hooks=hooks)
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)
    again = sample(model, scheduler, [2, 5], config, seed=3, cfg="batch", hooks=hooks)
    assert torch.equal(one, again)  # reset per generation: nothing leaks from the previous one

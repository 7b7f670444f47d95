"""Rollout training: the student generates whole samples with the feature cache in the loop, as it is served."""
import copy

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import elastic_compile as ec
from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache, remove_feature_cache
from elastic_compile.errors import ConfigError
from elastic_compile.sampling import SamplingConfig, sample
from elastic_compile.state import state_of
from elastic_compile.train import record_class_conditional_trajectories, train_routers
from elastic_compile.train.rollout import (ClassConditionalRollout, calibrate_threshold, call_fraction,
                                           generation_fraction, rollout_step)
from zoo import ARCHITECTURES

STEPS = 6
CONFIG = SamplingConfig(num_inference_steps=STEPS, guidance_scale=2.0, sample_size=8, in_channels=4, num_classes=10,
                        null_class=10)
ACTIONS = ("reuse", "forecast", "forecast2")
CACHE = FeatureCacheConfig(max_reuse=2, fallback="run")


def elastic(width_buckets=(0.5, 1.0)):
    model, inputs = ARCHITECTURES["dit"](batch=4)
    return ec.transform(model, ec.ElasticConfig(width_buckets=width_buckets, skip_actions=ACTIONS),
                        example_inputs=inputs)


def randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in state_of(model).routers.values():
            router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=g))
            router.fc2.bias.copy_(torch.randn(router.fc2.bias.shape, generator=g))


def served(model, items):
    """Final samples as served: hard decisions, the feature cache on, no gradients."""
    apply_feature_cache(model, CACHE)
    try:
        return sample(model, FlowMatchEulerDiscreteScheduler(), [c for c, _ in items], CONFIG,
                      seeds=[s for _, s in items], hooks=ElasticCacheHooks(model))
    finally:
        remove_feature_cache(model)


def test_a_training_rollout_computes_what_is_served():
    """The differentiable rollout's forward values (straight-through decisions, widths and skip actions, the cache's
    rules in the loop) are the served generation's, and its budget is the generation's executed fraction."""
    model = elastic()
    randomize(model, seed=3)
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=1)
    items = rollout.pool[:5]
    expected = served(model, items)
    _, mse, fraction = rollout_step(model, rollout, items, torch.zeros_like(expected), CACHE, call_fraction)
    assert float(mse.detach()) == pytest.approx(float(expected.pow(2).mean()), rel=1e-5)
    fraction = float(fraction.detach())
    assert fraction == pytest.approx(generation_fraction(model, rollout, items, CACHE), abs=1e-5)
    assert 0.05 < fraction < 0.95  # the routers skip and narrow: the check covers stand-ins and widths
    assert state_of(model).cache is None and not state_of(model).soft  # nothing left switched on


def test_rollout_gradients_reach_every_router_head():
    model = elastic()
    randomize(model, seed=3)
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=1)
    log_mse, _, fraction = rollout_step(model, rollout, rollout.pool[:4], torch.zeros(4, 4, 8, 8), CACHE,
                                        call_fraction)
    (log_mse + fraction).backward()
    for router in state_of(model).routers.values():
        grad = router.fc2.weight.grad
        assert grad is not None and bool(grad[0].ne(0).any())           # run logit
        assert bool(grad[1 + router.num_widths:].ne(0).any())           # skip actions


def final_error(model, items, targets) -> float:
    return float((served(model, items) - targets).pow(2).mean())


def test_rollout_training_lowers_the_final_sample_error_of_per_step_training():
    """Same routers after per-step (cache-aware) training, then either calibrated as they are or trained further
    through rollouts: at the same served compute, the rollout-trained routers' final samples are closer to dense
    on held-out noise."""
    torch.manual_seed(0)
    model = elastic(width_buckets=(1.0,))
    scheduler = FlowMatchEulerDiscreteScheduler()
    data = record_class_conditional_trajectories(model, scheduler, CONFIG, samples_per_class=2, seed=100)
    train_routers(model, data, budget=0.5, steps=60, batch_size=32, lr=3e-3, cache_aware=True, cache_max_reuse=2,
                  progress=False, seed=0)
    rollout = ClassConditionalRollout(scheduler, CONFIG, per_class=3, first_seed=200)
    held_out = [(c, 900 + c) for c in range(10)]
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        targets = sample(model, scheduler, [c for c, _ in held_out], CONFIG, seeds=[s for _, s in held_out])
    per_step = copy.deepcopy(model)
    calibrate_threshold(per_step, rollout, 0.5, CACHE)
    report = train_routers(model, rollout, objective="rollout", budget=0.5, steps=40, batch_size=6, lr=3e-3,
                           cache_max_reuse=2, progress=False, seed=0, lr_schedule="constant")
    fractions = [generation_fraction(m, rollout, held_out, CACHE) for m in (per_step, model)]
    assert all(abs(f - 0.5) < 0.08 for f in fractions), fractions
    errors = [final_error(m, held_out, targets) for m in (per_step, model)]
    assert errors[1] < 0.9 * errors[0], errors  # measured: 3.0e-4 against 3.9e-4
    assert report.history[-1].executed_fraction == pytest.approx(report.history[-1].expected_fraction)
    assert state_of(model).serving["feature_cache"] == {"max_reuse": 2, "fallback": "run", "forecast_min_points": 2}


def test_threshold_calibration_meets_the_budget_on_whole_generations():
    model = elastic(width_buckets=(1.0,))
    randomize(model, seed=5)
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=2)
    for budget in (0.6, 0.8):   # above the floor: forecasts wait for two points, so a 6-step generation runs >= 1/2
        tau = calibrate_threshold(model, rollout, budget, CACHE)
        assert 0.0 < tau < 1.0 and state_of(model).config.threshold == tau
        assert generation_fraction(model, rollout, rollout.pool[::2], CACHE) == pytest.approx(budget, abs=0.08)


def test_rollout_objective_says_what_it_needs():
    model = elastic()
    data = record_class_conditional_trajectories(model, FlowMatchEulerDiscreteScheduler(), CONFIG,
                                                 samples_per_class=1)
    with pytest.raises(ConfigError, match="rollout"):
        train_routers(model, data, objective="rollout", steps=1, progress=False)
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=1)
    with pytest.raises(ConfigError, match="router-only"):
        train_routers(model, rollout, objective="rollout", train_base=True, steps=1, progress=False)
    with pytest.raises(ConfigError, match="objective"):
        train_routers(model, rollout, objective="trajectory", steps=1, progress=False)


def test_a_budget_below_what_the_cache_allows_trains_for_the_floor_with_a_warning():
    """max_reuse 1 with fallback "run": a block runs at least every other call, so every-block-skips is the floor."""
    model = elastic(width_buckets=(1.0,))
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=1)
    cache = FeatureCacheConfig(max_reuse=1, fallback="run")
    with ec.force(model, skip=True):
        floor = generation_fraction(model, rollout, rollout.pool, cache)
    assert 0.3 < floor < 0.9
    with pytest.warns(UserWarning, match="below the lowest executed fraction"):
        report = train_routers(model, rollout, objective="rollout", budget=0.05, cache_max_reuse=1, steps=1,
                               batch_size=2, progress=False)
    assert report.budget == pytest.approx(floor, abs=0.05)
    assert generation_fraction(model, rollout, rollout.pool, cache) >= floor - 1e-3


def test_recalibrating_in_the_loop_holds_the_served_fraction_on_the_budget():
    """Without the post-training calibration: routers that start far off the budget stay off it after a short
    run, while recalibrating every few steps trains them at the threshold that serves the budget."""
    rollout = ClassConditionalRollout(FlowMatchEulerDiscreteScheduler(), CONFIG, per_class=2)
    held_out = [(c, 900 + c) for c in range(10)]
    fractions = {}
    for every in (0, 2):
        model = elastic(width_buckets=(1.0,))
        randomize(model, seed=5)
        start = generation_fraction(model, rollout, held_out, CACHE)
        train_routers(model, rollout, objective="rollout", budget=0.6, steps=5, batch_size=4, lr=1e-3,
                      cache_max_reuse=2, calibrate=False, recalibrate_every=every, progress=False, seed=0)
        fractions[every] = (start, generation_fraction(model, rollout, held_out, CACHE),
                            state_of(model).config.threshold)
    assert abs(fractions[0][1] - 0.6) > 0.1, fractions           # the multiplier alone does not get there
    assert fractions[2][1] == pytest.approx(0.6, abs=0.06), fractions
    assert fractions[0][2] == 0.5 and fractions[2][2] != 0.5

"""Cache-aware router training: step links in recorded trajectories, and the training skip = the cache's skip."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.cache import FeatureCacheConfig, apply_feature_cache, cache_context, remove_feature_cache
from elastic_compile.sampling import SamplingConfig, denoiser_output, sample
from elastic_compile.state import state_of
from elastic_compile.train import record_class_conditional_trajectories, record_trajectories, train_routers
from elastic_compile.train.cache_aware import dense_stand_ins, exactly_steps_back
from train_fixtures import TRAIN_ARGS, tiny_dataset, tiny_elastic_model
from zoo import ARCHITECTURES

STEPS = 5
CONFIG = SamplingConfig(num_inference_steps=STEPS, guidance_scale=2.0, sample_size=8, in_channels=4, num_classes=10,
                        null_class=10)


def sampler_model():
    """A DiT whose forward the sampler can call (x, timestep, class labels)."""
    model, inputs = ARCHITECTURES["dit"](batch=4)
    return ec.transform(model, example_inputs=inputs)


@pytest.fixture(scope="module")
def linked():
    model = sampler_model()
    data = record_class_conditional_trajectories(model, FlowMatchEulerDiscreteScheduler(), CONFIG,
                                                 samples_per_class=1, batch_size=4)
    return model, data


def test_every_row_links_to_the_same_sample_one_step_earlier(linked):
    _, data = linked
    assert len(data) == STEPS * 2 * 10  # 10 labels in generations of 4, 4 and 2 samples, CFG doubling each
    first = data.previous < 0
    assert int(first.sum()) == 2 * 10  # each sample and branch starts once
    timesteps = data.rows["timestep"]
    later = (~first).nonzero().flatten()
    previous = data.previous[later]
    assert torch.all(timesteps[previous] > timesteps[later])  # one step earlier in the (decreasing) schedule
    assert torch.equal(data.rows["class_labels"][previous], data.rows["class_labels"][later])  # same sample, same branch (label or null)
    # walking back from a last-step row visits STEPS rows, one per timestep
    row, visited = int(later[-1]), 1
    while int(data.previous[row]) >= 0:
        row, visited = int(data.previous[row]), visited + 1
    assert visited == STEPS


def test_recording_without_hooks_has_no_links_and_cache_aware_training_says_what_to_do():
    model = sampler_model()
    data = record_trajectories(model, lambda d: sample(d, FlowMatchEulerDiscreteScheduler(), [1, 2], CONFIG))
    assert data.previous is None
    with pytest.raises(ConfigError, match="hooks"):
        train_routers(model, data, cache_aware=True, **TRAIN_ARGS)
    with pytest.raises(ConfigError, match="previous sampling step"):
        train_routers(tiny_elastic_model(), tiny_dataset(), cache_aware=True, **TRAIN_ARGS)
    linked = record_trajectories(model, lambda d: sample(d, FlowMatchEulerDiscreteScheduler(), [1, 2], CONFIG,
                                                           hooks=d))
    assert int((linked.previous >= 0).sum()) == (STEPS - 1) * 4


def test_reuse_stand_ins_are_the_previous_dense_block_updates_and_zero_at_first_steps(linked):
    model, data = linked
    rows = torch.tensor([0, 1, len(data) - 1, len(data) - 2])
    updates = dense_stand_ins(model, data, rows, max_reuse=1)
    previous = data.previous[rows]
    inputs = data.batch(previous.clamp(min=0))
    seen = {}
    blocks = state_of(model).blocks

    def keep(index):
        def hook(module, args, kwargs, output):
            seen[index] = ((args[0] if args else kwargs["hidden_states"]), output)
        return hook
    hooks = [b.register_forward_hook(keep(i), with_kwargs=True) for i, b in enumerate(blocks)]
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        model(**inputs)
    for h in hooks:
        h.remove()
    assert set(updates) == {s.index for s in state_of(model).specs if s.skippable}
    for block, leaves in updates.items():
        x, out = seen[block]
        expected = (out - x) * (previous >= 0).float().reshape(-1, 1, 1)
        assert leaves[0].shape[0] == 1  # one skip action: reuse
        torch.testing.assert_close(leaves[0][0], expected)
    assert bool((previous < 0).any()) and bool((previous >= 0).any())


def test_training_skip_equals_the_feature_cache_skip_at_inference(linked):
    """Student forward with the training skip == the hard model with the cache filled by the previous step."""
    model, data = linked
    rows = (data.previous >= 0).nonzero().flatten()[:6]
    with torch.no_grad():
        for router in state_of(model).routers.values():
            router.fc2.bias[0] = -5.0  # skip every skippable block
        state = state_of(model)
        state.soft_stand_ins = dense_stand_ins(model, data, rows, max_reuse=1)
        state.soft = True
        try:
            trained_view = denoiser_output(model(**data.batch(rows)))
        finally:
            state.soft, state.soft_stand_ins = False, None
        apply_feature_cache(model, FeatureCacheConfig(max_reuse=1))
        try:
            with cache_context(model, "c"):
                with ec.force(model, skip=False, width=1.0):
                    model(**data.batch(data.previous[rows]))
                served = denoiser_output(model(**data.batch(rows)))
            assert sum(d.reused for block in ec.stats(model).decisions for d in block) > 0
        finally:
            remove_feature_cache(model)
            for router in state_of(model).routers.values():
                router.reset_to_full_capacity()
    torch.testing.assert_close(trained_view, served, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), ec.force(model, skip=True):
        identity_skip = denoiser_output(model(**data.batch(rows)))
    assert (served - identity_skip).abs().max() > 1e-3  # the reuse is not the identity skip


def test_exactly_steps_back_walks_the_links_and_says_where_a_trajectory_ends(linked):
    _, data = linked
    last = int((data.previous >= 0).nonzero().flatten()[-1])
    chain = [last]
    while int(data.previous[chain[-1]]) >= 0:
        chain.append(int(data.previous[chain[-1]]))
    assert len(chain) == STEPS
    rows = torch.tensor([last] * 6 + [chain[-1]])
    back = exactly_steps_back(data, rows, torch.tensor([1, 2, 3, 4, STEPS - 1, STEPS + 3, 2]))
    assert back.tolist() == [chain[1], chain[2], chain[3], chain[4], chain[STEPS - 1], -1, -1]


@pytest.mark.parametrize("action", ["forecast", "forecast2"])
def test_training_forecast_equals_the_feature_cache_forecast_at_inference(action):
    """A forecasting skip in per-step training (from dense updates 1..3 steps back) is what the cache serves after
    the dense model ran those steps: the same extrapolation of the same updates."""
    model = ec.transform(ARCHITECTURES["dit"](batch=4)[0], ec.ElasticConfig(skip_actions=(action,)),
                         example_inputs=ARCHITECTURES["dit"](batch=4)[1])
    data = record_class_conditional_trajectories(model, FlowMatchEulerDiscreteScheduler(), CONFIG,
                                                 samples_per_class=1, batch_size=4)
    # rows at the last step: the three steps before exist
    rows = torch.tensor([r for r in range(len(data)) if int(exactly_steps_back(data, torch.tensor([r]),
                                                                               torch.tensor([3]))[0]) >= 0][:4])
    with torch.no_grad():
        for router in state_of(model).routers.values():
            router.fc2.bias[0] = -5.0  # skip every skippable block
        state = state_of(model)
        ones = torch.ones(len(rows), dtype=torch.long)
        state.soft_stand_ins = dense_stand_ins(model, data, rows, ages=ones, spacings=ones)
        state.soft = True
        try:
            trained_view = denoiser_output(model(**data.batch(rows)))
        finally:
            state.soft, state.soft_stand_ins = False, None
        apply_feature_cache(model, FeatureCacheConfig(max_reuse=1, fallback="run"))
        try:
            with cache_context(model, "c"):
                with ec.force(model, skip=False, width=1.0):
                    for back in (3, 2, 1):
                        model(**data.batch(exactly_steps_back(data, rows, torch.full((len(rows),), back))))
                served = denoiser_output(model(**data.batch(rows)))
            skippable = [spec.index for spec in state.specs if spec.skippable]
            decisions = ec.stats(model).decisions
            assert skippable and all(d.reused for b in skippable for d in decisions[b])
        finally:
            remove_feature_cache(model)
    torch.testing.assert_close(trained_view, served, atol=1e-5, rtol=1e-5)


def test_cache_aware_training_reaches_the_budget_it_charges(linked, tmp_path):
    model, data = linked
    fresh = sampler_model()
    report = train_routers(fresh, data, cache_aware=True, cache_max_reuse=2,
                           **{**TRAIN_ARGS, "steps": 40, "lr_schedule": "constant"})
    assert report.history[0].executed_fraction > 0.99
    final = report.final
    assert abs(final.expected_fraction - 0.5) < 0.15
    # a skip is charged a third of its block (one refresh run in K + 1 = 3 steps), so fewer FLOPs execute per call
    assert final.executed_fraction < final.expected_fraction
    assert state_of(fresh).soft_stand_ins is None
    # the routers remember how they must be served, across save/load
    ec.save(fresh, tmp_path / "routers")
    base, _ = ARCHITECTURES["dit"](batch=4)
    loaded = ec.load(base, tmp_path / "routers")
    cache = apply_feature_cache(loaded)
    assert (cache.config.max_reuse, cache.config.fallback) == (2, "run")
    plain = sampler_model()
    assert apply_feature_cache(plain).config.fallback == "identity"

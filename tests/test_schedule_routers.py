"""Schedule routers: a per-step, per-block run table served as ordinary routers (train/schedule_routers.py)."""
import random

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

import elastic_compile as ec
from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
from elastic_compile.errors import ConfigError
from elastic_compile.sampling import SamplingConfig, sample
from elastic_compile.sampling.hooks import SamplerHooks
from elastic_compile.state import state_of
from elastic_compile.train import fit_schedule_routers
from elastic_compile.train.schedule_routers import longest_stand_in
from zoo import ARCHITECTURES

STEPS = 6
CONFIG = SamplingConfig(num_inference_steps=STEPS, guidance_scale=2.0, sample_size=8, in_channels=4, num_classes=10,
                        null_class=10)
LABELS = [1, 4, 7]


def elastic(skip_actions=("reuse", "forecast2")):
    model, inputs = ARCHITECTURES["dit"](batch=4)
    return ec.transform(model, ec.ElasticConfig(width_buckets=(1.0,), skip_actions=skip_actions),
                        example_inputs=inputs)


def random_table(blocks: int, seed: int) -> list[list[bool]]:
    rng = random.Random(seed)
    return [[step < 2 or rng.random() < 0.5 for _ in range(blocks)] for step in range(STEPS)]


class StepHooks(SamplerHooks):
    """Cache hooks that also remember the step the sampler is at."""

    def __init__(self, inner):
        self.inner, self.step = inner, -1

    def start_generation(self):
        self.inner.start_generation()

    def end_generation(self):
        self.inner.end_generation()

    def branch(self, name, step):
        self.step = step.step_index
        return self.inner.branch(name, step)


def forced_by_table(model, table, actions=None):
    """Images of ``model`` with every run decision pinned by ``table`` (the schedule the routers must serve) and,
    given ``actions``, every stand-in's skip action (None there: the model's last); without: the first."""
    hooks = StepHooks(ElasticCacheHooks(model))
    names = state_of(model).config.skip_actions

    def denoiser(*args, **kwargs):
        skip = {b for b, runs in enumerate(table[hooks.step]) if not runs}
        action = None if actions is None else {b: actions[hooks.step][b] or names[-1] for b in skip}
        with ec.force(model, skip=skip, width=1.0, action=action):
            return model(*args, **kwargs)

    denoiser.parameters = model.parameters
    return sample(denoiser, FlowMatchEulerDiscreteScheduler(), LABELS, CONFIG, seed=5, hooks=hooks)


def fit(model, table):
    fit_schedule_routers(model, table, lambda: sample(model, FlowMatchEulerDiscreteScheduler(), [0, 3], CONFIG,
                                                      seed=11))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fitted_routers_serve_the_table_exactly(seed, tmp_path):
    """Saved, loaded and served with the cache their artifact records, the routers make the table's decisions at
    every step for every sample: the images equal the generation with each decision pinned by ``force``."""
    model = elastic()
    blocks = len(state_of(model).blocks)
    table = random_table(blocks, seed)
    fit(model, table)
    ec.save(model, tmp_path / "routers")
    served = ec.load(ARCHITECTURES["dit"](batch=4)[0], tmp_path / "routers")  # the cache as the artifact says
    cache = state_of(served).serving["feature_cache"]
    assert cache == {"max_reuse": longest_stand_in(table), "fallback": "run", "forecast_min_points": 2}
    assert state_of(served).cache.config == FeatureCacheConfig(**cache)
    images = sample(served, FlowMatchEulerDiscreteScheduler(), LABELS, CONFIG, seed=5,
                    hooks=ElasticCacheHooks(served))
    reference = elastic(skip_actions=("forecast2",))  # a forced skip takes the model's first action
    apply_feature_cache(reference, FeatureCacheConfig(**cache))
    expected = forced_by_table(reference, table)
    torch.testing.assert_close(images, expected, rtol=0, atol=1e-6)
    dense = sample(elastic(), FlowMatchEulerDiscreteScheduler(), LABELS, CONFIG, seed=5)
    assert (images - dense).abs().max() > 1e-4  # the table skips blocks: the schedule is not the dense model


def random_actions(table, seed: int, names=("reuse", "forecast2")) -> list[list[str | None]]:
    rng = random.Random(seed)
    return [[None if runs else rng.choice(names) for runs in row] for row in table]


@pytest.mark.parametrize("seed", [0, 1])
def test_an_action_table_is_served_cell_by_cell(seed, tmp_path):
    """With a skip action per (step, block), the saved and loaded routers stand in with each cell's action: the
    images equal the generation with every run decision and every stand-in's action pinned, and differ from the
    same run table served with one action everywhere."""
    model = elastic()
    blocks = len(state_of(model).blocks)
    table = random_table(blocks, seed)
    actions = random_actions(table, seed)
    fit_schedule_routers(model, table, lambda: sample(model, FlowMatchEulerDiscreteScheduler(), [0, 3], CONFIG,
                                                      seed=11), action=actions)
    ec.save(model, tmp_path / "routers")
    served = ec.load(ARCHITECTURES["dit"](batch=4)[0], tmp_path / "routers")
    cache = FeatureCacheConfig(**state_of(served).serving["feature_cache"])
    images = sample(served, FlowMatchEulerDiscreteScheduler(), LABELS, CONFIG, seed=5,
                    hooks=ElasticCacheHooks(served))
    reference = elastic()
    apply_feature_cache(reference, cache)
    torch.testing.assert_close(images, forced_by_table(reference, table, actions), rtol=0, atol=1e-6)
    uniform = elastic()
    apply_feature_cache(uniform, cache)
    one_action = forced_by_table(uniform, table, [[None] * blocks for _ in table])
    assert (images - one_action).abs().max() > 1e-5  # the per-cell actions were not all the default


def test_action_tables_of_the_wrong_shape_or_with_unknown_actions_are_refused():
    model = elastic()
    blocks = len(state_of(model).blocks)
    table = random_table(blocks, 0)
    generate = lambda: sample(model, FlowMatchEulerDiscreteScheduler(), [0, 3], CONFIG, seed=11)  # noqa: E731
    with pytest.raises(ConfigError, match="action table"):
        fit_schedule_routers(model, table, generate, action=[[None] * blocks])
    with pytest.raises(ConfigError, match="skip actions"):
        fit_schedule_routers(model, table, generate, action=[["forecast"] * blocks for _ in table])


def test_the_action_head_picks_the_requested_stand_in():
    model = elastic()
    fit_schedule_routers(model, random_table(len(state_of(model).blocks), 0),
                         lambda: sample(model, FlowMatchEulerDiscreteScheduler(), [0, 3], CONFIG, seed=11),
                         action="reuse")
    for router in state_of(model).routers.values():
        actions = router.fc2.bias[1 + router.num_widths:]
        assert int(actions.argmax()) == 0 and torch.all(router.fc2.weight[1 + router.num_widths:] == 0)


def test_longest_stand_in_counts_steps_in_a_row_per_block():
    table = [[True, True], [False, True], [False, False], [True, False], [False, False]]
    assert longest_stand_in(table) == 3  # block 1: steps 2, 3, 4
    assert longest_stand_in([[True, True]] * 3) == 1


def test_tables_that_do_not_fit_the_model_are_refused():
    model = elastic()
    blocks = len(state_of(model).blocks)
    generate = lambda: sample(model, FlowMatchEulerDiscreteScheduler(), [0, 3], CONFIG, seed=11)  # noqa: E731
    with pytest.raises(ConfigError, match="one per block"):
        fit_schedule_routers(model, [[True] * (blocks + 1)] * STEPS, generate)
    with pytest.raises(ConfigError, match="distinct steps"):
        fit_schedule_routers(model, [[True] * blocks] * (STEPS + 1), generate)
    with pytest.raises(ConfigError, match="skip actions"):
        fit_schedule_routers(model, [[True] * blocks] * STEPS, generate, action="forecast")
    one_sample = lambda: model(torch.randn(1, 4, 8, 8), timestep=torch.tensor([500.0]),  # noqa: E731
                               class_labels=torch.tensor([2]))
    with pytest.raises(ConfigError, match="several samples"):
        fit_schedule_routers(model, [[True] * blocks], one_sample)

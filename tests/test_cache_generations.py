"""The feature cache starts each generation afresh without ``reset_cache``: a call whose timestep moves back
against the direction of the context's steps (``cache/generation.py``), or a diffusers pipeline's
``_reset_stateful_cache()``, resets the caller's rows, so two same-seed generations are equal and equal a fresh
model's."""
import contextlib
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.cache.diffusers_protocol import HOOK_NAME
from elastic_compile.cache.generation import GenerationClock, timestep_argument, timestep_value
from elastic_compile.sampling import sample
from elastic_compile.sampling.hooks import SamplerHooks
from elastic_compile.state import state_of
from helpers import randomize_routers, reference_case
from zoo import ARCHITECTURES, first_output

STEPS = 4


class BranchOnly(SamplerHooks):
    """Cache contexts per branch and never a reset: a user who forgets ``reset_cache``. ``served``: per call,
    whether the cache stood in for a block."""

    def __init__(self, model):
        self.model = model
        self.served = []

    @contextlib.contextmanager
    def branch(self, name, step):
        with ec.cache_context(self.model, name):
            yield
        self.served.append(served_by_cache(self.model))


def served_by_cache(model) -> bool:
    """Whether the cache stood in for a block in the calling thread's last forward."""
    return any(any(call.reused) for call in state_of(model).settled_calls())


@pytest.fixture(scope="module")
def reference():
    base, _, scheduler, config = reference_case()
    from elastic_compile.reference import ASSETS_DIR
    fresh = lambda: ec.load(copy.deepcopy(base), ASSETS_DIR / "routers")  # noqa: E731
    return fresh, scheduler, config


@pytest.mark.parametrize("cfg", ["batch", "separate"])
def test_same_seed_generations_without_reset_equal_a_fresh_models(reference, cfg):
    fresh, scheduler, config = reference
    model = fresh()
    cache = ec.apply_feature_cache(model)
    hooks = BranchOnly(model)
    generate = lambda m: sample(m, scheduler, [3, 7], config, seed=5, num_inference_steps=STEPS,  # noqa: E731
                                cfg=cfg, hooks=hooks if m is model else BranchOnly(m))
    first, second = generate(model), generate(model)
    other = fresh()
    ec.apply_feature_cache(other)
    alone = generate(other)
    assert torch.equal(first, second) and torch.equal(first, alone)
    assert cache.auto_resets == (1 if cfg == "batch" else 2)  # once per context, at the second generation
    assert any(hooks.served)  # the cache served blocks: a carried-over update would show
    # the same without detection (no timestep found): the second generation starts from the first one's updates
    cache.timestep = ("no_such_argument", None)
    ec.reset_cache(model)
    assert torch.equal(generate(model), first)
    assert not torch.allclose(generate(model), first, atol=1e-3)


@pytest.fixture(scope="module")
def flux():
    """A tiny diffusers Flux transformer (it has diffusers' ``_reset_stateful_cache``), random routers, cache on."""
    model, inputs = ARCHITECTURES["flux"](seed=0, batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=2)
    return model, inputs


def calls(model, inputs, timesteps, context="c", served=None):
    """The model's outputs at these timesteps in one context; ``served`` collects whether the cache stood in."""
    outs = []
    with torch.no_grad(), ec.cache_context(model, context):
        for t in timesteps:
            outs.append(first_output(model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})))
            if served is not None:
                served.append(served_by_cache(model))
    return outs


def test_pipeline_reset_protocol_resets_the_cache(flux):
    model, inputs = flux
    assert timestep_argument(model) is not None and timestep_argument(model)[0] == "timestep"
    cache = ec.apply_feature_cache(model, ec.FeatureCacheConfig(max_reuse=3))
    assert "_reset_stateful_cache" not in model.__dict__  # the protocol's hook, not a patched method
    try:
        first = calls(model, inputs, [0.9, 0.6, 0.3])
        assert cache.entries
        model._reset_stateful_cache()  # what diffusers pipelines call at the end of each generation
        assert not cache.entries
        cache.timestep = ("no_such_argument", None)  # only the protocol resets now
        again = calls(model, inputs, [0.9, 0.6, 0.3])
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        ec.remove_feature_cache(model)
    assert model._diffusers_hook.get_hook(HOOK_NAME) is None


def test_timestep_going_back_up_resets_on_a_runtime(tiny_export):
    """The exported ONNX Runtime runtime detects new generations too (its model's root hook)."""
    out, _, inputs = tiny_export
    runtime = ec.runtime.load(out, threads=1)
    cache = ec.apply_feature_cache(runtime, ec.FeatureCacheConfig(max_reuse=3))
    schedule = [900, 600, 300, 100]
    served = []
    first = calls(runtime, inputs, schedule, served=served)
    second = calls(runtime, inputs, schedule)
    assert all(torch.equal(a, b) for a, b in zip(first, second)) and cache.auto_resets == 1
    assert any(served)
    cache.timestep = ("no_such_argument", None)
    ec.reset_cache(runtime)
    calls(runtime, inputs, schedule)
    carried = calls(runtime, inputs, schedule)
    assert not all(torch.equal(a, b) for a, b in zip(first, carried))


@settings(max_examples=200, deadline=None)
@given(direction=st.sampled_from([-1, 1]),
       generations=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=6), min_size=1, max_size=5),
       starts=st.lists(st.integers(1, 50), min_size=5, max_size=5))
def test_clock_resets_exactly_where_a_generation_starts(direction, generations, starts):
    """Generations of one direction (steps of 0 = a repeated timestep, at least one real step each): a reset
    exactly at the first call of every generation after the first."""
    clock, expected, got, position = GenerationClock(), [], [], 0.0
    for g, steps in enumerate(generations):
        steps = steps if any(steps) else steps + [1]
        position = position - direction * starts[g] if g else 0.0  # starts back beyond where the last one ended
        values = [position]
        for step in steps:
            values.append(values[-1] + direction * step)
        position = values[-1]
        for k, value in enumerate(values):
            got.append(clock.advance(value))
            expected.append(g > 0 and k == 0)
    assert got == expected


def test_timestep_value_reads_positional_keyword_and_scalar_timesteps():
    where = ("t", 1)
    assert timestep_value((None, torch.tensor([3.0, 7.0])), {}, where) == 7.0
    assert timestep_value((), {"t": torch.tensor(4)}, where) == 4.0
    assert timestep_value((), {"t": 0.5}, where) == 0.5
    assert timestep_value((), {"timestep": torch.tensor([2.0])}, None) == 2.0
    assert timestep_value((), {"t": torch.tensor([True])}, where) is None
    assert timestep_value((), {}, where) is None

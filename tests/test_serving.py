"""An artifact is served as trained (issue 25, item 1): ``ec.load`` of routers trained cache-aware turns their
feature cache back on, and a plain sampling loop (no hooks, no cache context, no reset) gives what the
explicitly cached run gives."""
import copy

import pytest
import torch
from hypothesis import given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.cache import CacheContextError, cache_context, serving_cache_hooks
from elastic_compile.reference import ASSETS_DIR, load_classifier, load_reference
from elastic_compile.reference.metrics import class_accuracy, psnr
from elastic_compile.sampling import sample
from elastic_compile.serving import PlainCalls
from elastic_compile.state import state_of

ROUTERS = ASSETS_DIR / "routers"
LABELS = list(range(10))


def _loaded(cache="auto"):
    if not (ROUTERS / "elastic.json").is_file():
        pytest.skip("bundled routers are not there")
    model, scheduler, config = load_reference()
    return ec.load(model, ROUTERS, cache=cache), scheduler, config


@pytest.fixture(scope="module")
def served():
    """The bundled routers' generation as served explicitly (cache on, its hooks), and the dense one."""
    model, scheduler, config = _loaded(cache="off")
    dense = sample(load_reference()[0], scheduler, LABELS, config, seed=0)
    hooked = sample(model, scheduler, LABELS, config, seed=0, hooks=serving_cache_hooks(model))
    return hooked, dense


def test_bundled_routers_are_served_as_trained_by_a_plain_sampling_loop(served):
    hooked, dense = served
    model, scheduler, config = _loaded()
    assert state_of(model).cache is not None and state_of(model).cache.config.fallback == "run"
    first = sample(model, scheduler, LABELS, config, seed=0)  # no hooks: no context, no reset
    second = sample(model, scheduler, LABELS, config, seed=0)  # the cache left by the first must not leak in
    torch.testing.assert_close(first, hooked, atol=1e-6, rtol=0)
    torch.testing.assert_close(second, hooked, atol=1e-6, rtol=0)
    classifier = load_classifier()
    labels = torch.tensor(LABELS)
    assert class_accuracy(classifier, first, labels).mean >= 0.9
    assert psnr(first, dense).mean > 25
    # what loading did before: the same routers without their cache are far off (the test can fail)
    bare, _, _ = _loaded(cache="off")
    unserved = sample(bare, scheduler, LABELS, config, seed=0)
    assert psnr(unserved, dense).mean < psnr(first, dense).mean - 10


def test_classifier_free_guidance_as_two_plain_calls_keeps_the_branches_apart(served):
    model, scheduler, config = _loaded()
    explicit, _, _ = _loaded(cache="off")
    kwargs = dict(seed=1, cfg="separate", num_inference_steps=8)
    expected = sample(explicit, scheduler, LABELS[:4], config, hooks=serving_cache_hooks(explicit), **kwargs)
    got = sample(model, scheduler, LABELS[:4], config, **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_a_hand_written_loop_is_served_like_the_sampler(served):
    """The loop a diffusers user writes (no guidance: one call per step), twice, equals the hooked sampler."""
    model, scheduler, config = _loaded()
    explicit, _, _ = _loaded(cache="off")
    labels = [3, 8, 1]
    expected = sample(explicit, scheduler, labels, config, seed=2, guidance_scale=1.0, num_inference_steps=8,
                      hooks=serving_cache_hooks(explicit))
    for _ in range(2):
        sched = copy.deepcopy(scheduler)
        sched.set_timesteps(8)
        x = torch.stack([torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(2 + i)) for i in range(3)])
        with torch.no_grad():
            for t in sched.timesteps:
                v = model(x, timestep=t.expand(3), class_labels=torch.tensor(labels), return_dict=False)[0]
                x = sched.step(v, t, x).prev_sample
        torch.testing.assert_close(x.clamp(-1, 1), expected, atol=1e-5, rtol=0)


def test_the_exported_runtime_is_served_as_trained(served, tmp_path):
    model, scheduler, config = _loaded()
    inputs = dict(hidden_states=torch.randn(4, 1, 8, 8), timestep=torch.tensor([50.0, 300.0, 600.0, 950.0]),
                  class_labels=torch.tensor([1, 5, 10, 7]), return_dict=False)
    out = ec.export(model, inputs, tmp_path / "export", batch_sizes=[4], scheduler=scheduler, sampling_config=config,
                    threads=1)
    runtime = ec.runtime.load(out, threads=1)
    explicit, _, _ = _loaded(cache="off")
    kwargs = dict(num_inference_steps=6, seed=4)
    expected = sample(explicit, scheduler, [2, 6], config, hooks=serving_cache_hooks(explicit), **kwargs)
    for _ in range(2):
        torch.testing.assert_close(runtime.sample([2, 6], **kwargs), expected, atol=1e-3, rtol=0)
    runtime.close()


def test_calls_of_a_model_without_a_timestep_parameter_need_a_context(tmp_path):
    """Where the timestep cannot be found, the served model refuses a call outside a context (typed)."""
    from elastic_compile.models import DiT, dit_config

    class Opaque(DiT):
        def forward(self, latents, level, y):
            return super().forward(latents, level, y)

    torch.manual_seed(0)
    base = Opaque(input_size=8, in_channels=4, num_classes=10, **dit_config("tiny", depth=3)).eval()
    inputs = dict(latents=torch.randn(2, 4, 8, 8), level=torch.rand(2) * 1000, y=torch.tensor([1, 2]))
    fresh = copy.deepcopy(base)
    model = ec.transform(base, example_inputs=inputs)
    state_of(model).serving["feature_cache"] = {"max_reuse": 2, "fallback": "run"}
    ec.save(model, tmp_path / "a")
    loaded = ec.load(fresh, tmp_path / "a")
    with pytest.raises(CacheContextError), torch.no_grad():
        loaded(**inputs)
    with cache_context(loaded, "cond"), torch.no_grad():
        loaded(**inputs)


def test_cache_off_and_an_unknown_cache_mode():
    model, _, _ = _loaded(cache="off")
    assert state_of(model).cache is None
    with pytest.raises(ec.errors.ConfigError, match="cache"):
        _loaded(cache="on")


def _schedule(length, descending, start):
    values = [start + 10.0 * i for i in range(length)]
    return values[::-1] if descending else values


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(2, 6), st.integers(1, 2)), min_size=1, max_size=4),
       st.booleans())
def test_plain_calls_start_a_generation_exactly_where_one_starts(generations, descending):
    """Generations of >= 2 steps, each step called once or twice (CFG as two calls): a reset at each first call
    and nowhere else; the k-th call of a step gets context ``plain-k``."""
    calls = PlainCalls(("timestep", 1))
    for length, branches in generations:
        for step, t in enumerate(_schedule(length, descending, 5.0)):
            for branch in range(branches):
                name, new = calls.place(t)
                assert new == (step == 0 and branch == 0)
                assert name == f"plain-{branch}"

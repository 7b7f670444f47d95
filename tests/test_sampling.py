"""The shared sampling loop: determinism, batch independence, CFG modes, hooks, diffusers cache hooks."""
from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch

from elastic_compile.errors import ConfigError, DenoiserError
from elastic_compile.reference import load_reference
from elastic_compile.sampling.hooks import DiffusersCacheHooks, SamplerHooks
from elastic_compile.sampling import SamplingConfig, initial_noise, sample

STEPS = 4
LABELS = [1, 3, 5, 7]


@pytest.fixture(scope="module")
def reference():
    return load_reference()


def test_same_seed_gives_identical_images_and_other_seeds_differ(reference):
    model, scheduler, config = reference
    a = sample(model, scheduler, LABELS, config, seed=3, num_inference_steps=STEPS)
    b = sample(model, scheduler, LABELS, config, seed=3, num_inference_steps=STEPS)
    c = sample(model, scheduler, LABELS, config, seed=4, num_inference_steps=STEPS)
    assert a.shape == (4, 1, 8, 8) and torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1.0 and a.max() <= 1.0


def test_sample_does_not_depend_on_its_batch(reference):
    model, scheduler, config = reference
    batch = sample(model, scheduler, LABELS, config, seeds=[10, 11, 12, 13], num_inference_steps=STEPS)
    for i, label in enumerate(LABELS):
        alone = sample(model, scheduler, [label], config, seeds=[10 + i], num_inference_steps=STEPS)
        torch.testing.assert_close(alone[0], batch[i], atol=1e-5, rtol=0)


def test_seed_is_the_first_of_consecutive_per_sample_seeds(reference):
    model, scheduler, config = reference
    by_seed = sample(model, scheduler, LABELS, config, seed=20, num_inference_steps=2)
    by_seeds = sample(model, scheduler, LABELS, config, seeds=[20, 21, 22, 23], num_inference_steps=2)
    assert torch.equal(by_seed, by_seeds)
    noise = initial_noise([5, 6], (1, 8, 8))
    assert torch.equal(noise[1], initial_noise([6], (1, 8, 8))[0])


def test_batched_and_separate_cfg_agree(reference):
    model, scheduler, config = reference
    batched = sample(model, scheduler, LABELS, config, seed=0, num_inference_steps=STEPS, cfg="batch")
    separate = sample(model, scheduler, LABELS, config, seed=0, num_inference_steps=STEPS, cfg="separate")
    torch.testing.assert_close(batched, separate, atol=1e-4, rtol=0)


def test_guidance_one_is_plain_conditional_sampling(reference):
    model, scheduler, config = reference
    guided = sample(model, scheduler, LABELS, config, seed=0, num_inference_steps=STEPS, guidance_scale=1.0)
    # The same loop written out with the scheduler alone.
    sched = copy.deepcopy(scheduler)
    sched.set_timesteps(STEPS)
    x = initial_noise([0, 1, 2, 3], (1, 8, 8))
    labels = torch.tensor(LABELS)
    with torch.no_grad():
        for t in sched.timesteps:
            v = model(x, timestep=t.expand(4), class_labels=labels, return_dict=False)[0]
            x = sched.step(v, t, x, return_dict=False)[0]
    torch.testing.assert_close(guided, x.clamp(-1, 1), atol=1e-5, rtol=0)
    strong = sample(model, scheduler, LABELS, config, seed=0, num_inference_steps=STEPS, guidance_scale=3.0)
    assert not torch.allclose(guided, strong, atol=1e-3)


def test_scheduler_is_not_mutated(reference):
    model, scheduler, config = reference
    before = (len(scheduler.timesteps), scheduler.step_index)
    sample(model, scheduler, [0], config, num_inference_steps=2)
    assert (len(scheduler.timesteps), scheduler.step_index) == before


class RecordingHooks(SamplerHooks):
    def __init__(self):
        self.events: list[str] = []

    def start_generation(self):
        self.events.append("start")

    @contextlib.contextmanager
    def branch(self, name, step):
        self.events.append(f"{name}@{step.step_index}/{step.num_inference_steps}")
        yield

    def end_generation(self):
        self.events.append("end")


@pytest.mark.parametrize("cfg, guidance, per_step", [
    ("batch", 2.0, ["cond_uncond"]), ("separate", 2.0, ["cond", "uncond"]), ("batch", 1.0, ["cond"])])
def test_hooks_see_one_start_named_branches_and_one_end(reference, cfg, guidance, per_step):
    model, scheduler, config = reference
    hooks = RecordingHooks()
    sample(model, scheduler, [2], config, num_inference_steps=2, guidance_scale=guidance, cfg=cfg, hooks=hooks)
    expected = ["start"] + [f"{name}@{i}/2" for i in range(2) for name in per_step] + ["end"]
    assert hooks.events == expected


def test_end_generation_runs_when_the_denoiser_fails(reference):
    _, scheduler, config = reference
    hooks = RecordingHooks()

    def broken(x, timestep, class_labels, return_dict):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        sample(broken, scheduler, [0], config, num_inference_steps=2, hooks=hooks)
    assert hooks.events[0] == "start" and hooks.events[-1] == "end"


def test_denoiser_output_conventions(reference):
    model, scheduler, config = reference
    base = sample(model, scheduler, [4], config, num_inference_steps=2)

    def as_tensor(x, timestep, class_labels, return_dict):
        return model(x, timestep=timestep, class_labels=class_labels, return_dict=False)[0]

    def as_object(x, timestep, class_labels, return_dict):
        return SimpleNamespace(sample=as_tensor(x, timestep, class_labels, return_dict))

    for wrapped in (as_tensor, as_object):
        torch.testing.assert_close(sample(wrapped, scheduler, [4], config, num_inference_steps=2), base)
    with pytest.raises(DenoiserError):
        sample(lambda x, **kw: "nope", scheduler, [4], config, num_inference_steps=2)
    with pytest.raises(DenoiserError):
        sample(lambda x, **kw: (x[:, :, :4],), scheduler, [4], config, num_inference_steps=2)


def test_bad_arguments_raise_config_errors(reference):
    model, scheduler, config = reference
    with pytest.raises(ConfigError):
        sample(model, scheduler, [0], config, cfg="interleaved")
    with pytest.raises(ConfigError):
        sample(model, scheduler, [11], config)
    with pytest.raises(ConfigError):
        sample(model, scheduler, [0, 1], config, seeds=[1])
    with pytest.raises(ConfigError):
        sample(model, scheduler, [0], config, latents=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ConfigError):
        SamplingConfig(num_inference_steps=0)


def test_first_block_cache_runs_through_the_sampler_and_is_reset_per_generation():
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    model, scheduler, config = load_reference()
    kwargs = dict(num_inference_steps=6)
    dense = sample(model, scheduler, LABELS, config, seed=100, **kwargs)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=10.0))  # skip whenever a cache exists
    hooks = DiffusersCacheHooks(model)
    with pytest.raises(ValueError, match="cache context"):  # diffusers refuses to run without a context
        sample(model, scheduler, LABELS, config, seed=100, **kwargs)
    for cfg in ("separate", "batch"):
        fresh = sample(model, scheduler, LABELS, config, seed=100, cfg=cfg, hooks=hooks, **kwargs)
        sample(model, scheduler, LABELS, config, seed=0, cfg=cfg, hooks=hooks, **kwargs)
        after_other = sample(model, scheduler, LABELS, config, seed=100, cfg=cfg, hooks=hooks, **kwargs)
        assert torch.equal(fresh, after_other)  # reset between generations: nothing leaks
        assert (fresh - dense).abs().max() > 1e-2  # the cache really skipped blocks

    # Without the reset, a generation reuses the previous generation's residuals from its very first step.
    class ContextOnly(DiffusersCacheHooks):
        def start_generation(self):
            pass

        def end_generation(self):
            pass

    leaky = ContextOnly(model)
    hooks.start_generation()
    sample(model, scheduler, LABELS, config, seed=0, cfg="separate", hooks=leaky, **kwargs)
    leaked = sample(model, scheduler, LABELS, config, seed=100, cfg="separate", hooks=leaky, **kwargs)
    fresh = sample(model, scheduler, LABELS, config, seed=100, cfg="separate", hooks=hooks, **kwargs)
    assert not torch.allclose(leaked, fresh, atol=1e-3)


def test_first_block_cache_with_zero_threshold_reproduces_the_dense_model():
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    model, scheduler, config = load_reference()
    dense = sample(model, scheduler, LABELS, config, seed=0, num_inference_steps=4)
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=0.0))
    cached = sample(model, scheduler, LABELS, config, seed=0, num_inference_steps=4, hooks=DiffusersCacheHooks(model))
    torch.testing.assert_close(cached, dense, atol=1e-6, rtol=0)

"""The feature cache speaks diffusers' cache protocol (issue 25, item 2): real pipelines built offline from tiny
random parts (DiT, PixArt-Alpha, Flux) drive the elastic cache with no toolkit code, true-CFG branches keep their
cached updates apart, the pipeline resets the cache, and diffusers' own hooks (first-block cache, layerwise
casting, group offloading: tests/test_group_offloading.py) work beside it."""
import contextlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import elastic_compile as ec  # noqa: E402
from elastic_compile.cache.diffusers_protocol import HOOK_NAME  # noqa: E402
from elastic_compile.serve.loader import Runtime  # noqa: E402
from elastic_compile.state import state_of  # noqa: E402
from helpers import randomize_routers  # noqa: E402
import tiny_pipelines  # noqa: E402

TEXT = dict(height=16, width=16, max_sequence_length=8)
CALLS = {
    "dit": (tiny_pipelines.dit_pipeline, dict(class_labels=[1, 2], guidance_scale=1.0)),
    "pixart": (tiny_pipelines.pixart_pipeline, dict(prompt=["a cat", "a red dog"], use_resolution_binning=False,
                                                     clean_caption=False, **TEXT)),
    "flux": (tiny_pipelines.flux_pipeline, dict(prompt=["a cat on the grass"], **TEXT)),
}
TRUE_CFG = dict(negative_prompt=["blurry ugly"], true_cfg_scale=3.0)
STEPS = 4


def _run(pipe, call, seed=0):
    return pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, output_type="np",
                **call).images


def _elastic(name, cache=True, **extra):
    """The pipeline, its dense output, and its transformer made elastic (random routers) with the cache on (or
    not yet)."""
    build, call = CALLS[name]
    call = {**call, **extra}
    pipe = build()
    dense = _run(pipe, call)
    inputs = ec.capture_inputs(pipe, num_inference_steps=STEPS, **call)
    ec.transform(pipe.transformer, example_inputs=inputs)
    randomize_routers(pipe.transformer, seed=3)
    if cache:
        ec.apply_feature_cache(pipe.transformer)
    return pipe, call, dense


def _contexts_seen(model):
    """The elastic cache's context at each call of ``model`` (a forward pre-hook; call ``.remove()`` on it)."""
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args: seen.append(state_of(module).cache.context))
    return seen, handle


@contextlib.contextmanager
def _explicit_contexts(model, rename=lambda name: name):
    """The pipeline's ``transformer.cache_context(name)`` done by hand with ``ec.cache_context`` (the protocol hook
    removed): the reference the protocol must equal."""
    model._diffusers_hook.remove_hook(HOOK_NAME, recurse=False)
    model.cache_context = lambda name, **kwargs: ec.cache_context(model, rename(name))
    try:
        yield
    finally:
        del model.cache_context


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_pipeline_drives_the_elastic_cache_without_toolkit_code(name):
    pipe, call, dense = _elastic(name)
    model = pipe.transformer
    first = _run(pipe, call)
    second = _run(pipe, call)  # what the first call cached must not leak in
    np.testing.assert_allclose(first, second, atol=1e-6, rtol=0)
    # the reference: the whole call in one explicit context, the cache reset before
    ec.reset_cache(model)
    with ec.cache_context(model, "explicit"):
        explicit = _run(pipe, call)
    np.testing.assert_allclose(first, explicit, atol=1e-6, rtol=0)
    # the cache is in effect: without it the same routers give another image
    ec.remove_feature_cache(model)
    assert abs(_run(pipe, call) - first).max() > 1e-3
    # forced dense equals the untransformed pipeline, with or without the cache
    with ec.force(model, skip=False, width=1.0):
        np.testing.assert_allclose(_run(pipe, call), dense, atol=1e-5, rtol=0)
        ec.apply_feature_cache(model)
        np.testing.assert_allclose(_run(pipe, call), dense, atol=1e-5, rtol=0)


def test_flux_true_cfg_keeps_cond_and_uncond_apart_and_the_pipeline_resets_the_cache():
    pipe, call, _ = _elastic("flux", **TRUE_CFG)
    model = pipe.transformer
    seen, handle = _contexts_seen(model)
    stored = []
    model.register_forward_hook(lambda *a: stored.append({c for c, _ in state_of(model).cache.entries}))
    first = _run(pipe, call)
    handle.remove()
    assert seen == ["cond", "uncond"] * STEPS
    assert stored[-1] == {"cond", "uncond"}  # both branches hold their own updates
    assert state_of(model).cache.entries == {} and state_of(model).cache.context is None  # _reset_stateful_cache
    np.testing.assert_allclose(_run(pipe, call), first, atol=1e-6, rtol=0)
    with _explicit_contexts(model):
        np.testing.assert_allclose(_run(pipe, call), first, atol=1e-6, rtol=0)
    with _explicit_contexts(model, rename=lambda name: "shared"):  # what sharing one context would give
        assert abs(_run(pipe, call) - first).max() > 1e-3


def test_remove_feature_cache_removes_the_hook_and_apply_puts_it_back_once():
    pipe, call, _ = _elastic("flux")
    model = pipe.transformer
    ec.apply_feature_cache(model)
    assert model._diffusers_hook._hook_order.count(HOOK_NAME) == 1
    ec.remove_feature_cache(model)
    assert model._diffusers_hook.get_hook(HOOK_NAME) is None
    with model.cache_context("cond"), torch.no_grad():
        assert state_of(model).cache is None
    _run(pipe, call)  # no cache, no context needed


def test_first_block_cache_and_layerwise_casting_work_beside_the_elastic_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    pipe, call, _ = _elastic("flux", **TRUE_CFG)
    model = pipe.transformer
    model.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    first = _run(pipe, call)
    np.testing.assert_allclose(_run(pipe, call), first, atol=1e-6, rtol=0)  # both caches reset by the pipeline
    with model.cache_context("cond"):
        assert ec.stats(model).dense_flops > 0  # profiled under the first-block cache's hooks
        assert state_of(model).cache.context == "cond"
    model.disable_cache()
    assert model._diffusers_hook.get_hook(HOOK_NAME) is not None  # diffusers' off switch leaves the elastic cache
    plain = _run(pipe, call)
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    cast = _run(pipe, call)
    assert np.isfinite(cast).all() and abs(cast - plain).max() < 0.5
    assert ec.stats(model).dense_flops > 0
    np.testing.assert_allclose(_run(pipe, call), cast, atol=1e-6, rtol=0)  # stats left the weights as they were
    assert model.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_runtime_as_the_transformer_with_the_cache_applied_to_it_equals_the_elastic_model(name):
    """The cache turned on through the runtime (``ec.apply_feature_cache(runtime)``): Flux names its branches
    through the runtime's ``cache_context``; DiT and PixArt name none, so the runtime's calls get contexts from
    their timesteps as the model's own would."""
    pipe, call, _ = _elastic(name, cache=False, **(TRUE_CFG if name == "flux" else {}))
    model = pipe.transformer
    runtime = Runtime(model, {}, Path("."), "torch", None)  # what ec.runtime.load(dir, "torch") returns
    ec.apply_feature_cache(runtime)
    pipe.transformer = runtime
    first = _run(pipe, call)
    np.testing.assert_allclose(_run(pipe, call), first, atol=1e-6, rtol=0)
    ec.remove_feature_cache(runtime)
    pipe.transformer = model
    ec.apply_feature_cache(model)  # the reference: the cache on the model itself
    np.testing.assert_allclose(_run(pipe, call), first, atol=1e-6, rtol=0)

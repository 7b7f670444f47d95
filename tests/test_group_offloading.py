"""The elastic model under diffusers' group offloading (issue 25, item 2): a transformed Flux pipeline with its
feature cache gives the same images offloaded as not (block and leaf level, in memory and on disk: on disk the
offloaded weights are really gone between calls, so a router or a profiler that reads them outside its module's
call sees garbage), ``ec.stats`` works and leaves the weights as they were, and transform / load refuse a model
already offloaded (offloading would bring back the weights as they were before the rewrite)."""
import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")  # diffusers' group offloading moves the call's arguments with accelerate

import elastic_compile as ec  # noqa: E402
from diffusers.hooks import apply_group_offloading  # noqa: E402
from elastic_compile.errors import ConfigError  # noqa: E402
from elastic_compile.state import STATE_ATTRIBUTE  # noqa: E402
from helpers import randomize_routers  # noqa: E402
import tiny_pipelines  # noqa: E402

CALL = dict(prompt=["a cat on the grass"], negative_prompt=["blurry ugly"], true_cfg_scale=3.0, height=16, width=16,
            max_sequence_length=8)
STEPS = 4
OFFLOADS = {
    "block-memory": dict(offload_type="block_level", num_blocks_per_group=2),
    "block-disk": dict(offload_type="block_level", num_blocks_per_group=1, disk=True),
    "leaf-disk": dict(offload_type="leaf_level", disk=True),
}


def _run(pipe):
    return pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="np",
                **CALL).images


def _elastic_flux():
    pipe = tiny_pipelines.flux_pipeline()
    ec.transform(pipe.transformer, example_inputs=ec.capture_inputs(pipe, num_inference_steps=STEPS, **CALL))
    randomize_routers(pipe.transformer, seed=3)
    ec.apply_feature_cache(pipe.transformer)
    return pipe


def _offload(model, tmp_path, offload_type, num_blocks_per_group=None, disk=False):
    apply_group_offloading(model, onload_device="cpu", offload_device="cpu", offload_type=offload_type,
                           num_blocks_per_group=num_blocks_per_group, use_stream=False,
                           offload_to_disk_path=str(tmp_path) if disk else None)


@pytest.fixture(scope="module")
def reference():
    """Images and stats of the elastic pipeline without offloading (built as ``_elastic_flux`` builds every copy)."""
    pipe = _elastic_flux()
    images = _run(pipe)
    stats = ec.stats(pipe.transformer)
    assert stats.reused_fraction > 0 and stats.skipped_fraction < 1  # the cache serves, some blocks run
    return images, stats


@pytest.mark.parametrize("offload", sorted(OFFLOADS))
def test_the_elastic_model_and_its_cache_run_under_group_offloading_as_without(offload, reference, tmp_path):
    expected, before = reference
    pipe = _elastic_flux()  # offloaded before its first call: no router or profile computed from it yet
    model = pipe.transformer
    _offload(model, tmp_path, **OFFLOADS[offload])
    first = _run(pipe)
    # on disk the weights come back through safetensors, which moves float rounding (the dense model too)
    np.testing.assert_allclose(first, expected, atol=1e-5 if OFFLOADS[offload].get("disk") else 1e-6, rtol=0)
    np.testing.assert_allclose(_run(pipe), first, atol=1e-6, rtol=0)  # the pipeline reset the cache
    after = ec.stats(model)  # profiled on shape-only tensors with the offloading hooks in place
    assert (after.decisions, after.executed_flops, after.dense_flops) == \
        (before.decisions, before.executed_flops, before.dense_flops)
    assert all(p.device.type == "cpu" for p in model.parameters())  # no shape-only tensor left in the model
    np.testing.assert_allclose(_run(pipe), first, atol=1e-6, rtol=0)
    ec.remove_feature_cache(model)
    assert abs(_run(pipe) - first).max() > 1e-3  # the cache was in effect
    ec.apply_feature_cache(model)  # and goes back on beside the offloading hooks
    np.testing.assert_allclose(_run(pipe), first, atol=1e-6, rtol=0)


def test_transform_and_load_refuse_a_model_already_offloaded(tmp_path):
    source = tiny_pipelines.dit_pipeline()
    call = dict(class_labels=[1, 2], guidance_scale=1.0, num_inference_steps=2)
    inputs = ec.capture_inputs(source, **call)
    ec.save(ec.transform(source.transformer, example_inputs=inputs), tmp_path / "artifact")
    base = tiny_pipelines.dit_pipeline().transformer  # the same weights, offloaded before the rewrite
    _offload(base, tmp_path / "offload", "leaf_level", disk=True)
    with pytest.raises(ConfigError, match="group offloading"):
        ec.transform(base, example_inputs=inputs)
    with pytest.raises(ConfigError, match="then apply group offloading"):
        ec.load(base, tmp_path / "artifact")
    assert not hasattr(base, STATE_ATTRIBUTE)

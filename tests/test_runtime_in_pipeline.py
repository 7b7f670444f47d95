"""Pipelines (issue 25, items 3 and 5), with diffusers pipelines built offline from tiny random parts (DiT, and
PixArt-Alpha from ``tiny_pipelines``): an exported runtime stands in for ``pipe.transformer`` and gives what the
elastic model gives; ``ec.capture_inputs`` takes the transformer's example inputs from one pipeline call."""
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.serve.loader import Runtime
from helpers import randomize_routers


def test_a_runtime_is_a_pipelines_transformer():
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([10, 500]),
                  class_labels=torch.tensor([1, 2]), return_dict=False)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    runtime = Runtime(model, {}, Path("."), "torch", None)  # what ec.runtime.load(dir, "torch") returns
    assert runtime.config is model.config and runtime.dtype == torch.float32 and runtime.device.type == "cpu"
    call = dict(class_labels=[1, 2], num_inference_steps=3, guidance_scale=1.0, output_type="np")
    got = DiTPipeline(transformer=runtime, vae=vae, scheduler=DDIMScheduler())(
        generator=torch.Generator().manual_seed(0), **call).images
    expected = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())(
        generator=torch.Generator().manual_seed(0), **call).images
    assert got.shape == (2, 16, 16, 3)
    assert abs(got - expected).max() == 0


def test_capture_inputs_from_one_pipeline_call_makes_the_transformer_elastic():
    """``ec.capture_inputs(pipe, **call)``: the transformer's keyword arguments from the pipeline's first denoiser
    call (no denoising loop run), usable as transform's example inputs."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, sample_size=16).eval()
    pipe = DiTPipeline(transformer=model, vae=vae, scheduler=DDIMScheduler())
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    inputs = ec.capture_inputs(pipe, class_labels=[1, 2, 3], num_inference_steps=4, guidance_scale=1.0)
    assert calls == [] and not model._forward_pre_hooks  # stopped before the forward; the hook removed
    assert inputs["hidden_states"].shape == (3, 4, 8, 8) and inputs["class_labels"].tolist() == [1, 2, 3]
    assert inputs["timestep"].shape == (3,)
    with torch.no_grad():
        dense = model(**inputs).sample
    ec.transform(pipe.transformer, example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, dense, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError):
        ec.capture_inputs(pipe, component="unet", class_labels=[1])


def test_an_onnx_export_as_pixarts_transformer_with_the_cache_equals_the_elastic_model(tmp_path):
    """The exported runtime (ONNX Runtime) as the transformer of a text-conditioned pipeline that names no cache
    contexts, with the feature cache turned on through the runtime: the elastic model's images, call after call."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import tiny_pipelines

    call = dict(prompt=["a cat", "a red dog"], use_resolution_binning=False, clean_caption=False, height=16,
                width=16, max_sequence_length=8, num_inference_steps=4, output_type="np")
    pipe = tiny_pipelines.pixart_pipeline()
    inputs = ec.capture_inputs(pipe, **call)
    ec.transform(pipe.transformer, example_inputs=inputs)
    randomize_routers(pipe.transformer, seed=3)
    ec.apply_feature_cache(pipe.transformer)
    expected = pipe(generator=torch.Generator().manual_seed(0), **call).images
    assert ec.stats(pipe.transformer).reused_fraction > 0  # the cache serves
    runtime = ec.runtime.load(ec.export(pipe.transformer, inputs, tmp_path / "export", batch_sizes=[2], threads=1),
                              threads=1)
    ec.apply_feature_cache(runtime)  # random routers, not trained cache-aware: the export records no cache
    pipe.transformer = runtime
    for _ in range(2):
        got = pipe(generator=torch.Generator().manual_seed(0), **call).images
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert runtime.driver is not None and runtime.driver.calls > 0  # the exported graphs ran, not the fallback
    runtime.close()

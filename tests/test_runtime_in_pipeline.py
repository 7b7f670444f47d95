"""An exported runtime stands in for ``pipe.transformer`` (issue 25, item 3): a diffusers DiTPipeline built
offline with tiny random parts runs with the runtime as its transformer and gives what the elastic model gives."""
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import elastic_compile as ec
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

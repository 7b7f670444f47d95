"""Tiny random instances of every architecture the transform must handle, with one real forward's inputs.

Each builder returns ``(model, example_inputs)`` where ``example_inputs`` is a dict of keyword arguments.
Token counts are chosen so that no shared (non-batch) tensor has a leading dimension equal to the batch.
"""
from __future__ import annotations

import torch

BATCH = 2


def _seeded(fn):
    def build(seed: int = 0, batch: int = BATCH):
        torch.manual_seed(seed)
        model, inputs = fn(batch)
        return model.eval(), inputs
    build.__name__ = fn.__name__
    return build


@_seeded
def reference_dit(batch):
    from elastic_compile.models import DiT, dit_config
    model = DiT(input_size=8, in_channels=4, num_classes=10, **dit_config("tiny", depth=3))
    return model, dict(x=torch.randn(batch, 4, 8, 8), t=torch.rand(batch) * 1000, y=torch.randint(0, 11, (batch,)))


@_seeded
def dit(batch):
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=3,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8), timestep=torch.randint(0, 1000, (batch,)),
                       class_labels=torch.randint(0, 10, (batch,)), return_dict=False)


@_seeded
def pixart(batch):
    from diffusers import PixArtTransformer2DModel
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2,
                                     caption_channels=12, use_additional_conditions=False)
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8), encoder_hidden_states=torch.randn(batch, 5, 12),
                       timestep=torch.randint(0, 1000, (batch,)),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)


@_seeded
def sd3(batch):
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=16)
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8), encoder_hidden_states=torch.randn(batch, 5, 12),
                       pooled_projections=torch.randn(batch, 10), timestep=torch.randint(0, 1000, (batch,)),
                       return_dict=False)


@_seeded
def flux(batch):
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                   pooled_projection_dim=10, axes_dims_rope=(2, 2, 4))
    img_tokens, txt_tokens = 16, 5
    return model, dict(hidden_states=torch.randn(batch, img_tokens, 8), encoder_hidden_states=torch.randn(batch, txt_tokens, 12),
                       pooled_projections=torch.randn(batch, 10), timestep=torch.rand(batch),
                       img_ids=torch.randn(img_tokens, 3), txt_ids=torch.randn(txt_tokens, 3), return_dict=False)


@_seeded
def qwen_image(batch):
    from diffusers import QwenImageTransformer2DModel
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                        axes_dims_rope=(2, 2, 4))
    h = w = 4
    return model, dict(hidden_states=torch.randn(batch, h * w, 16), encoder_hidden_states=torch.randn(batch, 5, 12),
                       encoder_hidden_states_mask=torch.ones(batch, 5), timestep=torch.rand(batch),
                       img_shapes=[[(1, h, w)]] * batch, return_dict=False)


@_seeded
def hunyuan_dit(batch):
    from diffusers import HunyuanDiT2DModel
    model = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2,
                              sample_size=8, hidden_size=16, num_layers=4, cross_attention_dim=12,
                              cross_attention_dim_t5=16, pooled_projection_dim=16, text_len=5, text_len_t5=7,
                              use_style_cond_and_image_meta_size=False)
    grid = 4
    rope = (torch.randn(grid * grid, 8), torch.randn(grid * grid, 8))
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8), timestep=torch.rand(batch) * 1000,
                       encoder_hidden_states=torch.randn(batch, 5, 12), text_embedding_mask=torch.ones(batch, 5),
                       encoder_hidden_states_t5=torch.randn(batch, 7, 16), text_embedding_mask_t5=torch.ones(batch, 7),
                       image_rotary_emb=rope, return_dict=False)


@_seeded
def sana(batch):
    from diffusers import SanaTransformer2DModel
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2)
    return model, dict(hidden_states=torch.randn(batch, 4, 8, 8), encoder_hidden_states=torch.randn(batch, 5, 12),
                       timestep=torch.randint(0, 1000, (batch,)), return_dict=False)


@_seeded
def wan(batch):
    from diffusers import WanTransformer3DModel
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=4, text_dim=12, freq_dim=16, ffn_dim=40, num_layers=2,
                                  rope_max_seq_len=32)
    return model, dict(hidden_states=torch.randn(batch, 4, 2, 8, 8), timestep=torch.randint(0, 1000, (batch,)),
                       encoder_hidden_states=torch.randn(batch, 5, 12), return_dict=False)


@_seeded
def cogvideox(batch):
    from diffusers import CogVideoXTransformer3DModel
    model = CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                        time_embed_dim=16, text_embed_dim=12, num_layers=2, sample_width=8,
                                        sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=5,
                                        temporal_compression_ratio=4)
    return model, dict(hidden_states=torch.randn(batch, 2, 4, 8, 8), encoder_hidden_states=torch.randn(batch, 5, 12),
                       timestep=torch.randint(0, 1000, (batch,)), return_dict=False)


ARCHITECTURES = {
    "reference_dit": reference_dit,
    "dit": dit,
    "pixart": pixart,
    "sd3": sd3,
    "flux": flux,
    "qwen_image": qwen_image,
    "hunyuan_dit": hunyuan_dit,
    "sana": sana,
    "wan": wan,
    "cogvideox": cogvideox,
}


def first_output(out):
    """The main tensor of a model's output (tuple, ModelOutput or tensor)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    return out.sample


class GlueDiT(torch.nn.Module):
    """The hand-written DiT with glue code after its first block (the stream the second block reads is a new
    tensor): a block whose successor's router reads something its graph never sees."""

    def __init__(self):
        super().__init__()
        from elastic_compile.models.dit import DiT
        self.dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)

    def forward(self, x, t, y):
        dit = self.dit
        tokens = dit.x_embedder(x).flatten(2).transpose(1, 2) + dit.pos_embed
        c = dit.t_embedder(t) + dit.y_embedder(y)
        for index, block in enumerate(dit.blocks):
            tokens = block(tokens, c)
            if index == 0:
                tokens = tokens * 1.0
        shift, scale = dit.final_modulation(c).chunk(2, dim=1)
        tokens = dit.final_linear(dit.final_norm(tokens) * (1 + scale[:, None]) + shift[:, None])
        return dit._unpatchify(tokens)


def glue_dit():
    return GlueDiT().eval()

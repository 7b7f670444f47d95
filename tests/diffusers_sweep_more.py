"""More tiny configs for the DiT classes of diffusers' ``models/transformers/`` (issue 24), merged into
``diffusers_sweep.SWEEP``: each builder ``(batch) -> (model, example_inputs)`` writes the smallest consistent config
(1-2 blocks per kind, a few heads of width 8) read from the class's source, and one forward's inputs, batch-major.
"""
from __future__ import annotations

import torch

from diffusers_sweep_rest import REST, REST_PENDING, REST_PENDING_REASONS, WIDTH_ONLY


def _rand(*shape):
    return torch.randn(*shape)


def _steps(batch):
    return torch.randint(0, 1000, (batch,))


def _fill_zero_init(model):
    """Give every all-zero parameter (zero-initialised output and modulation layers) random values, so the
    untrained model's output is not identically zero and "untrained = dense" compares real numbers."""
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(std=0.1)
    return model


def transformer_2d(batch):
    from diffusers import Transformer2DModel
    model = Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                               num_layers=2, sample_size=8, patch_size=2, norm_type="ada_norm_single",
                               norm_elementwise_affine=False, norm_eps=1e-6, cross_attention_dim=16,
                               caption_channels=12, activation_fn="gelu-approximate", num_embeds_ada_norm=1000)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                       return_dict=False)


def hidream_image(batch):
    from diffusers import HiDreamImageTransformer2DModel
    model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                           num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                           caption_channels=[12, 10], text_emb_dim=6, num_routed_experts=2,
                                           num_activated_experts=1, axes_dims_rope=(4, 2, 2),
                                           max_resolution=(8, 8), llama_layers=[0, 1])
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), timesteps=_steps(batch),
                       encoder_hidden_states_t5=_rand(batch, 5, 12),
                       encoder_hidden_states_llama3=_rand(2, batch, 3, 10),
                       pooled_embeds=_rand(batch, 6), return_dict=False)


def omnigen(batch):
    from diffusers import OmniGenTransformer2DModel
    model = OmniGenTransformer2DModel(in_channels=4, patch_size=2, hidden_size=16, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=32, num_layers=2, pad_token_id=0,
                                      vocab_size=32, max_position_embeddings=64, original_max_position_embeddings=32,
                                      rope_scaling=dict(short_factor=[1.0] * 4, long_factor=[1.0] * 4),
                                      pos_embed_max_size=8, time_step_dim=8)
    seq = 1 + 16
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), timestep=torch.rand(batch), input_ids=None,
                       input_img_latents=[], input_image_sizes={}, attention_mask=torch.ones(batch, seq, seq),
                       position_ids=torch.arange(seq).repeat(batch, 1), return_dict=False)


def z_image(batch):
    from diffusers import ZImageTransformer2DModel
    model = ZImageTransformer2DModel(in_channels=4, dim=16, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=12, axes_dims=[2, 2, 4], axes_lens=[64, 16, 16])
    return model, dict(x=[_rand(4, 1, 8, 8) for _ in range(batch)], t=torch.rand(batch),
                       cap_feats=[_rand(5, 12) for _ in range(batch)], return_dict=False)


def easyanimate(batch):
    from diffusers import EasyAnimateTransformer3DModel
    model = EasyAnimateTransformer3DModel(num_attention_heads=1, attention_head_dim=16, in_channels=4, out_channels=4,
                                          patch_size=2, sample_width=8, sample_height=8, num_layers=2, mmdit_layers=2,
                                          time_embed_dim=8, text_embed_dim=12)
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), timestep=_steps(batch),
                       encoder_hidden_states=_rand(batch, 5, 12), return_dict=False)


def consis_id(batch):
    from diffusers import ConsisIDTransformer3DModel
    model = ConsisIDTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                       time_embed_dim=8, text_embed_dim=12, num_layers=2, sample_width=8,
                                       sample_height=8, sample_frames=5, patch_size=2, max_text_seq_length=5,
                                       use_rotary_positional_embeddings=False)
    return model, dict(hidden_states=_rand(batch, 2, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), return_dict=False)


def hunyuan_video15(batch):
    from diffusers import HunyuanVideo15Transformer3DModel
    model = HunyuanVideo15Transformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                             num_layers=2, num_refiner_layers=1, patch_size=1, patch_size_t=1,
                                             text_embed_dim=12, text_embed_2_dim=10, image_embed_dim=6,
                                             rope_axes_dim=(2, 2, 4), target_size=64)
    return model, dict(hidden_states=_rand(batch, 4, 1, 4, 4), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), encoder_attention_mask=torch.ones(batch, 5),
                       encoder_hidden_states_2=_rand(batch, 3, 10), encoder_attention_mask_2=torch.ones(batch, 3),
                       image_embeds=_rand(batch, 2, 6), return_dict=False)


def hunyuan_video_framepack(batch):
    from diffusers import HunyuanVideoFramepackTransformer3DModel
    model = HunyuanVideoFramepackTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                    attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                    num_refiner_layers=1, patch_size=2, text_embed_dim=12,
                                                    pooled_projection_dim=10, rope_axes_dim=(2, 2, 4),
                                                    has_image_proj=True, image_proj_dim=6, has_clean_x_embedder=True)
    return model, dict(hidden_states=_rand(batch, 4, 1, 8, 8), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), encoder_attention_mask=torch.ones(batch, 5),
                       pooled_projections=_rand(batch, 10), image_embeds=_rand(batch, 2, 6),
                       indices_latents=torch.arange(1),
                       guidance=_steps(batch).float(), latents_clean=_rand(batch, 4, 1, 8, 8),
                       indices_latents_clean=torch.arange(1), latents_history_2x=_rand(batch, 4, 2, 8, 8),
                       indices_latents_history_2x=torch.arange(2), latents_history_4x=_rand(batch, 4, 4, 8, 8),
                       indices_latents_history_4x=torch.arange(4), return_dict=False)


def ltx2_video(batch):
    from diffusers import LTX2VideoTransformer3DModel
    model = LTX2VideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4,
                                        audio_num_attention_heads=2, audio_attention_head_dim=8,
                                        audio_cross_attention_dim=16, num_layers=2, caption_channels=12)
    return model, dict(hidden_states=_rand(batch, 16, 8), audio_hidden_states=_rand(batch, 4, 4),
                       encoder_hidden_states=_rand(batch, 5, 12), audio_encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), encoder_attention_mask=torch.ones(batch, 5),
                       audio_encoder_attention_mask=torch.ones(batch, 5), num_frames=1, height=4, width=4,
                       audio_num_frames=4, return_dict=False)


def kandinsky5(batch):
    from diffusers import Kandinsky5Transformer3DModel
    model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=12, in_text_dim2=10, time_dim=8,
                                         out_visual_dim=4, patch_size=(1, 2, 2), model_dim=16, ff_dim=32,
                                         num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 2, 2))
    return model, dict(hidden_states=_rand(batch, 1, 8, 8, 4), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=torch.rand(batch), pooled_projections=_rand(batch, 10),
                       visual_rope_pos=(torch.arange(1), torch.arange(4), torch.arange(4)),
                       text_rope_pos=torch.arange(5), return_dict=False)


def stable_audio(batch):
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    model = StableAudioDiTModel(sample_size=8, in_channels=4, num_layers=2, attention_head_dim=8,
                                num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4,
                                cross_attention_dim=16, time_proj_dim=8, global_states_input_dim=10,
                                cross_attention_input_dim=12)
    rotary = get_1d_rotary_pos_embed(4, 8 + 1, use_real=True, repeat_interleave_real=False)
    return model, dict(hidden_states=_rand(batch, 4, 8), timestep=_steps(batch),
                       encoder_hidden_states=_rand(batch, 5, 12), global_hidden_states=_rand(batch, 1, 10),
                       rotary_embedding=rotary, return_dict=False)


def wan_animate(batch):
    from diffusers import WanAnimateTransformer3DModel
    model = WanAnimateTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                         in_channels=12, latent_channels=4, out_channels=4, text_dim=12, freq_dim=16,
                                         ffn_dim=32, num_layers=2, image_dim=6, rope_max_seq_len=32,
                                         motion_encoder_size=16, motion_style_dim=8, motion_dim=4,
                                         motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8},
                                         motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
                                         inject_face_latents_blocks=1, motion_encoder_batch_size=2)
    return model, dict(hidden_states=_rand(batch, 12, 2, 8, 8), timestep=_steps(batch),
                       encoder_hidden_states=_rand(batch, 5, 12), encoder_hidden_states_image=_rand(batch, 3, 6),
                       pose_hidden_states=_rand(batch, 4, 1, 8, 8), face_pixel_values=_rand(batch, 3, 1, 16, 16),
                       return_dict=False)


def qwen_image21(batch):
    from diffusers import QwenImage21Transformer2DModel
    model = QwenImage21Transformer2DModel(patch_size=1, in_channels=8, out_channels=8, num_layers=2,
                                          attention_head_dim=8, num_attention_heads=2, context_in_dim=12,
                                          axes_dims_rope=(2, 2, 4))
    return model, dict(hidden_states=_rand(batch, 16, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=torch.rand(batch), img_shapes=[[(1, 4, 4)]] * batch,
                       img_mask=torch.arange(9).repeat(batch, 1) >= 5,  # 5 text slots, then 4 slots of 2x2 tokens
                       encoder_hidden_states_mask=torch.ones(batch, 5, dtype=torch.bool), return_dict=False)


def glm_image(batch):
    from diffusers import GlmImageTransformer2DModel
    model = GlmImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                                       num_attention_heads=2, text_embed_dim=12, time_embed_dim=8, condition_dim=4,
                                       prior_vq_quantizer_codebook_size=16)
    size = torch.tensor([[64, 64]]).repeat(batch, 1)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       prior_token_id=torch.randint(0, 16, (batch, 16)),
                       prior_token_drop=torch.zeros(batch, dtype=torch.bool),
                       timestep=_steps(batch), target_size=size, crop_coords=torch.zeros(batch, 2, dtype=torch.long),
                       return_dict=False)


def flux3(batch):
    from diffusers import Flux3Transformer2DModel
    model = Flux3Transformer2DModel(in_channels=8, cond_in_channels=8, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                    timestep_channels=16, axes_dims_rope=(2, 2, 2, 2))
    return model, dict(hidden_states=_rand(batch, 16, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=torch.rand(batch), img_ids=_rand(16, 4), txt_ids=_rand(5, 4), return_dict=False)


def krea2(batch):
    from diffusers import Krea2Transformer2DModel
    model = Krea2Transformer2DModel(in_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                    num_key_value_heads=1, intermediate_size=32, timestep_embed_dim=16,
                                    text_hidden_dim=12, num_text_layers=2, text_num_attention_heads=2,
                                    text_num_key_value_heads=2, text_intermediate_size=24, num_layerwise_text_blocks=1,
                                    num_refiner_text_blocks=1, axes_dims_rope=(2, 2, 4))
    ids = torch.cat([torch.zeros(5, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.),
                                                                   indexing="ij"), -1).reshape(16, 3)])
    return model, dict(hidden_states=_rand(batch, 16, 8), encoder_hidden_states=_rand(batch, 5, 2, 12),
                       timestep=torch.rand(batch), position_ids=ids.long(), return_dict=False)


def ernie_image(batch):
    from diffusers import ErnieImageTransformer2DModel
    model = ErnieImageTransformer2DModel(hidden_size=16, num_attention_heads=2, num_layers=2, ffn_hidden_size=32,
                                         in_channels=4, out_channels=4, patch_size=1, text_in_dim=12,
                                         rope_axes_dim=(2, 2, 4))
    return _fill_zero_init(model), dict(hidden_states=_rand(batch, 4, 4, 4), timestep=torch.rand(batch),
                                        text_bth=_rand(batch, 5, 12), text_lens=torch.full((batch,), 5),
                                        return_dict=False)


def bria_fibo(batch):
    from diffusers import BriaFiboTransformer2DModel
    model = BriaFiboTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                       axes_dims_rope=[2, 2, 4], text_encoder_dim=10)
    return model, dict(hidden_states=_rand(batch, 16, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       text_encoder_layers=[_rand(batch, 5, 10) for _ in range(2)], timestep=_steps(batch).float(),
                       img_ids=_rand(16, 3), txt_ids=_rand(5, 3), return_dict=False)


def prx(batch):
    from diffusers import PRXTransformer2DModel
    model = PRXTransformer2DModel(in_channels=4, patch_size=2, context_in_dim=12, hidden_size=16, mlp_ratio=2.0,
                                  num_heads=2, depth=2, axes_dim=[4, 4])
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), timestep=torch.rand(batch),
                       encoder_hidden_states=_rand(batch, 5, 12), attention_mask=torch.ones(batch, 5, dtype=torch.bool),
                       return_dict=False)


def dreamlite(batch):
    from diffusers import DreamLiteTransformer2DModel
    model = DreamLiteTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=8, out_channels=8,
                                        num_layers=2, norm_num_groups=4, cross_attention_dim=12,
                                        use_linear_projection=True)
    return model, dict(hidden_states=_rand(batch, 8, 4, 4), encoder_hidden_states=_rand(batch, 5, 12),
                       return_dict=False)


def motif_video(batch):
    from diffusers import MotifVideoTransformer3DModel
    model = MotifVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                         num_layers=1, num_single_layers=1, patch_size=2, text_embed_dim=12,
                                         rope_axes_dim=(2, 2, 4))
    return model, dict(hidden_states=_rand(batch, 4, 1, 8, 8), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), encoder_attention_mask=torch.ones(batch, 5),
                       return_dict=False)


def joyimage_edit(batch):
    from diffusers import JoyImageEditTransformer3DModel
    model = JoyImageEditTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=16,
                                           num_attention_heads=2, text_dim=12, num_layers=2, rope_dim_list=[2, 2, 4])
    return model, dict(hidden_states=_rand(batch, 4, 1, 8, 8), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), return_dict=False)


def anyflow(batch):
    from diffusers import AnyFlowTransformer3DModel
    model = AnyFlowTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                      out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2,
                                      rope_max_seq_len=32)
    # frames-first input and per-frame timesteps, as the class reads them
    return model, dict(hidden_states=_rand(batch, 2, 4, 8, 8), timestep=torch.rand(batch, 2),
                       r_timestep=torch.rand(batch, 2),
                       encoder_hidden_states=_rand(batch, 5, 12), return_dict=False)


def longcat_audio(batch):
    from diffusers import LongCatAudioDiTTransformer
    model = LongCatAudioDiTTransformer(dit_dim=16, dit_depth=2, dit_heads=2, dit_text_dim=12, latent_dim=4)
    return _fill_zero_init(model), dict(hidden_states=_rand(batch, 8, 4), encoder_hidden_states=_rand(batch, 5, 12),
                       encoder_attention_mask=torch.ones(batch, 5, dtype=torch.bool), timestep=torch.rand(batch),
                       latent_cond=_rand(batch, 8, 4), return_dict=False)


def stable_audio3(batch):
    from diffusers import StableAudio3DiTModel
    model = StableAudio3DiTModel(io_channels=4, embed_dim=16, depth=2, num_heads=2, cond_token_dim=12,
                                 global_cond_dim=10, local_add_cond_dim=3, timestep_features_dim=8,
                                 num_memory_tokens=2)
    return model, dict(hidden_states=_rand(batch, 4, 8), timestep=torch.rand(batch),
                       encoder_hidden_states=_rand(batch, 5, 12), global_hidden_states=_rand(batch, 10),
                       return_dict=False)


def ace_step(batch):
    from diffusers import AceStepTransformer1DModel
    model = AceStepTransformer1DModel(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, head_dim=8, in_channels=12, audio_acoustic_hidden_dim=4,
                                      patch_size=2, sliding_window=4)
    return model, dict(hidden_states=_rand(batch, 8, 4), timestep=torch.rand(batch), timestep_r=torch.rand(batch),
                       encoder_hidden_states=_rand(batch, 5, 16), context_latents=_rand(batch, 8, 8),
                       return_dict=False)


def helios(batch):
    from diffusers import HeliosTransformer3DModel
    model = HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                     in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2,
                                     rope_dim=(4, 2, 2))
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), timestep=_steps(batch),
                       encoder_hidden_states=_rand(batch, 5, 12), return_dict=False)


def kandinsky6(batch):
    from diffusers import Kandinsky6Transformer3DModel
    model = Kandinsky6Transformer3DModel(in_visual_dim=4, out_visual_dim=4, in_text_dim=12, in_text_dim2=10,
                                         time_dim=8, model_dim=16, ff_dim=32, num_text_blocks=1, num_visual_blocks=2,
                                         axes_dims=(4, 2, 2), visual_cond=False)
    return model, dict(hidden_states=_rand(batch, 1, 8, 8, 4), encoder_hidden_states=_rand(batch, 5, 12),
                       pooled_projections=_rand(batch, 10), timestep=torch.rand(batch), return_dict=False)


def ideogram4(batch):
    from diffusers import Ideogram4Transformer2DModel
    model = Ideogram4Transformer2DModel(in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                                        intermediate_size=32, adaln_dim=8, llm_features_dim=12, mrope_section=(2, 1, 1))
    text, image = 5, 16  # one packed sample per row: text tokens, then the image's 4x4 tokens
    grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.), torch.arange(4.), indexing="ij"), -1)
    positions = torch.cat([torch.arange(text).float()[:, None].repeat(1, 3), grid.reshape(image, 3) + text])
    indicator = torch.tensor([3] * text + [2] * image)  # LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR
    return model, dict(hidden_states=_rand(batch, text + image, 8), timestep=torch.rand(batch),
                       encoder_hidden_states=_rand(batch, text + image, 12),
                       position_ids=positions.long().repeat(batch, 1, 1),
                       segment_ids=torch.zeros(batch, text + image, dtype=torch.long),
                       indicator=indicator.repeat(batch, 1), return_dict=False)


def nucleus_moe_image(batch):
    from diffusers import NucleusMoEImageTransformer2DModel
    # two blocks: the default strategy leaves the first three and the last block dense (no MoE at this depth); width
    # 48, as the dense FFN's width is rounded down to a multiple of 128 (a narrower model gets a zero-width FFN)
    model = NucleusMoEImageTransformer2DModel(patch_size=2, in_channels=16, num_layers=2, attention_head_dim=16,
                                              num_attention_heads=3, joint_attention_dim=12, axes_dims_rope=(4, 6, 6),
                                              num_experts=4, moe_intermediate_dim=16)
    return model, dict(hidden_states=_rand(batch, 16, 16), img_shapes=[(1, 4, 4)] * batch,
                       encoder_hidden_states=_rand(batch, 5, 12), encoder_hidden_states_mask=torch.ones(batch, 5),
                       timestep=torch.rand(batch), return_dict=False)









MORE = {
    "Transformer2DModel": transformer_2d,
    "OmniGenTransformer2DModel": omnigen,
    "ZImageTransformer2DModel": z_image,
    "EasyAnimateTransformer3DModel": easyanimate,
    "ConsisIDTransformer3DModel": consis_id,
    "HunyuanVideo15Transformer3DModel": hunyuan_video15,
    "HunyuanVideoFramepackTransformer3DModel": hunyuan_video_framepack,
    "LTX2VideoTransformer3DModel": ltx2_video,
    "Kandinsky5Transformer3DModel": kandinsky5,
    "StableAudioDiTModel": stable_audio,
    "WanAnimateTransformer3DModel": wan_animate,
    "QwenImage21Transformer2DModel": qwen_image21,
    "GlmImageTransformer2DModel": glm_image,
    "Flux3Transformer2DModel": flux3,
    "Krea2Transformer2DModel": krea2,
    "ErnieImageTransformer2DModel": ernie_image,
    "BriaFiboTransformer2DModel": bria_fibo,
    "PRXTransformer2DModel": prx,
    "DreamLiteTransformer2DModel": dreamlite,
    "MotifVideoTransformer3DModel": motif_video,
    "JoyImageEditTransformer3DModel": joyimage_edit,
    "AnyFlowTransformer3DModel": anyflow,
    "LongCatAudioDiTTransformer": longcat_audio,
    "StableAudio3DiTModel": stable_audio3,
    "AceStepTransformer1DModel": ace_step,
    "HeliosTransformer3DModel": helios,
    "Kandinsky6Transformer3DModel": kandinsky6,
    "Ideogram4Transformer2DModel": ideogram4,
    "NucleusMoEImageTransformer2DModel": nucleus_moe_image,
    "HiDreamImageTransformer2DModel": hidream_image,
    **REST,
}

#: what the coverage table should say about a tiny config's fractions (not a transform degradation)
NOTES = {
    "HunyuanVideo15Transformer3DModel": "tiny-config artefact: the ByT5 text projection has a hard-coded 2048-wide "
                                        "hidden layer, ~98% of this tiny model's FLOPs, so skipping blocks saves "
                                        "little "
                                        "here (at real sizes the blocks dominate)",
    "WanAnimateTransformer3DModel": "tiny-config artefact: the face motion encoder (convolutions outside the blocks) "
                                    "is a large share of this tiny model's FLOPs",
    "AnyFlowFARTransformer3DModel": "tiny-config artefact: the causal attention pads its 36 tokens to 128 and its "
                                    "8-wide heads to 16 for flex attention (counted dense), most of this tiny "
                                    "model's FLOPs, so width 1/4 saves little here",
    "WanAnimate2Transformer3DModel": "generation pass (kv_cache_mode='cached') with the KV cache filled by one "
                                     "reference pass in the builder; tiny-config artefact: the in-context flex "
                                     "attention packs 32 tokens into 128 queries x 256 keys (counted dense), most of "
                                     "this tiny model's FLOPs, so width 1/4 saves little here",
    "CosmosTransformer3DModel": "tiny config with extra_pos_embed_type=None (Cosmos-Predict2 style); with the default "
                                "'learnable' every block adds the positional embedding to its input stream, so "
                                "skipping it is not a residual skip: blocks are found, width-only, none skippable",
    **WIDTH_ONLY,
}

#: tiny configs whose class's forward runs but that the sweep cannot check yet (see the reasons)
MORE_PENDING = dict(REST_PENDING)
MORE_PENDING_REASONS = dict(REST_PENDING_REASONS)

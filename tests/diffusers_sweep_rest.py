"""Tiny configs of the last DiT classes of diffusers' ``models/transformers/`` (0.42) swept (issue 24), in the
pattern of ``diffusers_sweep_more.py`` (which merges ``REST`` into its ``MORE``), and the reasons for the classes
still without one.
"""
import torch


def _rand(*shape):
    return torch.randn(*shape)


def _steps(batch):
    return torch.randint(0, 1000, (batch,))


def joyimage_edit_plus(batch):
    from diffusers import JoyImageEditPlusTransformer3DModel
    model = JoyImageEditPlusTransformer3DModel(patch_size=[1, 2, 2], in_channels=4, out_channels=4, hidden_size=16,
                                               num_attention_heads=2, text_dim=12, num_layers=2,
                                               rope_dim_list=[2, 2, 4])
    # already patchified: 16 patches of one 1x4x4 grid per sample
    return model, dict(hidden_states=_rand(batch, 16, 4, 1, 2, 2), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), shape_list=[[(1, 4, 4)]] * batch,
                       return_dict=False)


def kandinsky6_sr(batch):
    from diffusers import Kandinsky6SRTransformer3DModel
    # the NABLA attention groups 8x8 token tiles: the grid is one tile; channels: latent, anchor, anchor mask
    model = Kandinsky6SRTransformer3DModel(in_visual_dim=4, out_visual_dim=4, time_dim=8, model_dim=16, ff_dim=32,
                                           num_visual_blocks=2, axes_dims=(4, 2, 2), nabla_window=(3, 3, 3))
    return model, dict(hidden_states=_rand(batch, 1, 8, 8, 9), timestep=_steps(batch).float(), return_dict=False)


def bria_fibo2(batch):
    from diffusers import BriaFibo2Transformer2DModel
    # encoder_hidden_states: one text bundle for the Perceiver (gist tokens), then one per injection layer
    model = BriaFibo2Transformer2DModel(in_channels=4, patch_size=2, dim=32, n_layers=3, n_refiner_layers=1, n_heads=2,
                                        cap_feat_dim=12, injection_layer_ids=(1,), perceiver_num_layers=1,
                                        min_num_gist_tokens=2, max_num_gist_tokens=4, gist_step=2, gist_min_text_len=2,
                                        gist_max_text_len=8, axes_dims=(4, 6, 6), axes_lens=(16, 16, 16))
    # inference weights: torch's FlopCounterMode (its module tracker) fails on the Perceiver's input, a view of the
    # parameter latent_queries made under no_grad, while that parameter requires grad (dense model alike)
    model.requires_grad_(False)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), timestep=torch.rand(batch),
                       encoder_hidden_states=_rand(batch, 2, 5, 12), return_dict=False)


def minimax_music3(batch):
    from diffusers import MiniMaxMusic3Transformer1DModel
    model = MiniMaxMusic3Transformer1DModel(in_channels=4, condition_dim=12, num_layers=2, num_attention_heads=2,
                                            attention_head_dim=8, ff_inner_dim=32, rotary_dim=4,
                                            fourier_embedding_dim=16)
    return model, dict(hidden_states=_rand(batch, 4, 10), timestep=torch.rand(batch),
                       encoder_hidden_states=_rand(batch, 10, 12), return_dict=False)


def sana_wm_refiner(batch):
    from diffusers import SanaWMLTX2RefinerTransformer3DModel
    # LTX-2's video stream run as one autoregressive window (no KV cache: plain full self-attention)
    model = SanaWMLTX2RefinerTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2,
                                                attention_head_dim=8, cross_attention_dim=16, audio_in_channels=4,
                                                audio_out_channels=4, audio_num_attention_heads=2,
                                                audio_attention_head_dim=8, audio_cross_attention_dim=16, num_layers=2,
                                                caption_channels=12)
    rope = model.build_rotary_emb_for_absolute_positions(batch, [0], 4, 4, torch.device("cpu"), 24.0)
    return model, dict(hidden_states=_rand(batch, 16, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=torch.rand(batch, 16), video_rotary_emb=rope,
                       encoder_attention_mask=torch.ones(batch, 5), return_dict=False)


def sana_wm(batch):
    from diffusers import SanaWMTransformer3DModel
    # one softmax-attention block and one linear-attention block (softmax_every_n=2); no camera conditions
    model = SanaWMTransformer3DModel(in_channels=4, num_layers=2, hidden_size=16, num_attention_heads=2,
                                     softmax_every_n=2, linear_head_dim=8, use_chunk_plucker_post_attn=False,
                                     chunk_plucker_post_attn_blocks=2, chunk_plucker_channels=8, image_size=64,
                                     caption_channels=12, mixed_precision="fp32")
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), timestep=torch.randint(0, 1000, (batch, 1, 2)).float(),
                       encoder_hidden_states=_rand(batch, 1, 5, 12), encoder_attention_mask=torch.ones(batch, 5),
                       return_dict=False)


def minimax_h3(batch):
    from diffusers import MiniMaxH3Transformer3DModel
    model = MiniMaxH3Transformer3DModel(num_attention_heads=2, attention_head_dim=12, hidden_size=24, num_layers=2,
                                        num_refiner_layers=1, ffn_dim=32, in_channels=4, audio_in_channels=4,
                                        text_dim=12, freq_dim=16, time_embed_hidden_dim=16, time_embed_dim=8,
                                        rope_freq_dim=2)
    # one packed sequence: 3 text rows (clean, timestep 0), 8 video rows (a 2x4 patch grid), 2 audio rows
    text, video, audio = torch.arange(0, 3), torch.arange(3, 11), torch.arange(11, 13)
    tags = torch.cat([torch.full((3,), 1), torch.full((8,), 0), torch.full((2,), 2)])
    positions = torch.zeros(13, 3, dtype=torch.long)
    positions[:, 0] = torch.arange(13)
    positions[3:11, 1], positions[3:11, 2] = torch.arange(8) // 4, torch.arange(8) % 4
    return model, dict(hidden_states=_rand(batch, 8, 16), audio_hidden_states=_rand(batch, 2, 4),
                       encoder_hidden_states=_rand(batch, 3, 12), timestep=torch.tensor([0.3, 0.0]),
                       timestep_indices=(tags == 1).long(), token_tags=tags, position_ids=positions,
                       video_indices=video, audio_indices=audio, text_indices=text, return_dict=False)


REST = {
    "JoyImageEditPlusTransformer3DModel": joyimage_edit_plus,
    "BriaFibo2Transformer2DModel": bria_fibo2,
    "MiniMaxMusic3Transformer1DModel": minimax_music3,
    "SanaWMLTX2RefinerTransformer3DModel": sana_wm_refiner,
    "SanaWMTransformer3DModel": sana_wm,
    "MiniMaxH3Transformer3DModel": minimax_h3,
}

#: tiny configs whose class's forward runs but that the sweep cannot check yet (see the reasons)
REST_PENDING = {
    "Kandinsky6SRTransformer3DModel": kandinsky6_sr,
}
REST_PENDING_REASONS = {
    "Kandinsky6SRTransformer3DModel": "transform works on the tiny config (2 blocks, both skippable, 2 FFN sites, "
                                      "untrained = dense 2.4e-7), but its NABLA attention runs flex_attention "
                                      "eagerly, which torch's FlopCounterMode cannot run (TypeError: no "
                                      "implementation found for 'torch.ops.higher_order.flex_attention'), so the "
                                      "FLOP fractions this sweep checks cannot be counted",
}


#: DiT classes without a tiny config here, each with what writing one involves (more than "inputs specific to it")
NOT_WRITTEN_REASONS = {
    "AnyFlowFARTransformer3DModel": "DiT without a tiny config in this sweep yet: frame-autoregressive, its forward "
                                    "takes a chunk partition, a flex-attention BlockMask and a KV-cache list, and its "
                                    "attention runs flex_attention (which torch's FlopCounterMode could not run "
                                    "eagerly for Kandinsky 6 SR, see there)",
    "Cosmos3OmniTransformer": "DiT without a tiny config in this sweep yet: a unified understanding + generation "
                              "vision-language decoder (mixture-of-transformers layers) whose forward takes token ids "
                              "and a packed multimodal sequence (text/vision/sound/action indexes, per-modality token "
                              "lists and timesteps) that a tiny config must keep consistent",
    "RFD4ProteinaTransformer": "DiT without a tiny config in this sweep yet: a protein-structure denoiser (backbone "
                               "coordinates and local latents with a pair representation) whose inputs are some "
                               "twenty protein feature channels (the config's feats_seq)",
    "WanAnimate2Transformer3DModel": "DiT without a tiny config in this sweep yet: two passes per step, a reference "
                                     "forward (kv_cache_mode='extract') fills a WanAnimate2KVCache that the generation "
                                     "forward (kv_cache_mode='cached') reads through flex attention, so one example "
                                     "call does not describe it",
}

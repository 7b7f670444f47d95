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


def anyflow_far(batch):
    from diffusers import AnyFlowFARTransformer3DModel
    # the causal training-rollout path (no KV cache): three one-frame chunks, the first beyond full_chunk_limit, so
    # it enters through the compressed (1x4x4) patch embedding; the FAR BlockMask is built inside the forward and
    # handed to every block (capture binds it as a constant); frames-first input, per-frame timesteps
    model = AnyFlowFARTransformer3DModel(patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=2,
                                         num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                         text_dim=12, freq_dim=16, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
                                         chunk_partition=(1, 1, 1))
    return model, dict(hidden_states=_rand(batch, 3, 4, 8, 8), timestep=torch.rand(batch, 3),
                       r_timestep=torch.rand(batch, 3), encoder_hidden_states=_rand(batch, 5, 12),
                       chunk_partition=[1, 1, 1], return_dict=False)


def wan_animate2(batch):
    from diffusers import WanAnimate2Transformer3DModel
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
    # the generation pass (kv_cache_mode="cached"), the one a denoising loop repeats; its KV cache is filled here by
    # the reference pass ("extract") on a 1x4x4 reference grid, once, as a pipeline does before its loop. No CLIP
    # image branch (use_img_emb=False: its projection is a fixed 1280-wide MLP that would dwarf this tiny model)
    model = WanAnimate2Transformer3DModel(patch_size=(1, 2, 2), text_len=8, in_dim=8, dim=32, ffn_dim=64, freq_dim=16,
                                          text_dim=12, out_dim=4, num_heads=2, num_layers=2, use_img_emb=False)
    cache = WanAnimate2KVCache(2)
    common = dict(encoder_hidden_states=[_rand(5, 12) for _ in range(batch)], kv_cache=cache, return_dict=False)
    reference_grid = torch.tensor([[1, 4, 4]] * batch)
    with torch.no_grad():
        model(hidden_states=[_rand(4, 1, 8, 8) for _ in range(batch)], timestep=torch.zeros(batch),
              condition_latents=[_rand(4, 1, 8, 8) for _ in range(batch)], kv_cache_mode="extract", seq_len=16,
              offset_grid_sizes=reference_grid, **common)
    # two latent frames of 4x4 tokens; the block mask is built for origin_len 4 (2 latent frames) of 64x64 pixels
    return model, dict(hidden_states=[_rand(4, 2, 8, 8) for _ in range(batch)], timestep=_steps(batch).float(),
                       condition_latents=[_rand(4, 2, 8, 8) for _ in range(batch)], kv_cache_mode="cached",
                       seq_len=32, reference_grid_sizes=reference_grid, origin_len=4, origin_area=[64, 64], **common)


def rfd4_proteina(batch):
    from diffusers import RFD4ProteinaTransformer
    # the smallest feature set: noisy backbone coordinates and local latents per token, their two times as the
    # condition, backbone pair distances as the pair representation (absent conditioning features stay unset)
    model = RFD4ProteinaTransformer(nlayers=2, token_dim=16, nheads=2, dim_cond=8, pair_repr_dim=8, latent_dim=4,
                                    token_type_emb_dim=4, cath_emb_dim=4, t_emb_dim=8, seq_sep_dim=8,
                                    xt_pair_dist_dim=6, feats_seq=("xt_bb_ca", "xt_local_latents"),
                                    feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
                                    feats_pair_repr=("xt_bb_ca_pair_dists",),
                                    feats_pair_cond=("time_emb_bb_ca", "time_emb_local_latents"),
                                    update_pair_repr_every_n=2, tri_mult_c=8, num_sequence_classes=5)
    tokens = 12
    flags = dict(is_in_context_conditioning=torch.zeros(batch, tokens, dtype=torch.bool),
                 supports_local_latent=torch.ones(batch, tokens, dtype=torch.bool))
    return model, dict(bb_ca=_rand(batch, tokens, 3), local_latents=_rand(batch, tokens, 4),
                       bb_ca_time=torch.rand(batch), local_latents_time=torch.rand(batch),
                       padding_mask=torch.ones(batch, tokens, dtype=torch.bool), conditioning=flags, return_dict=False)


def cosmos3_omni(batch):
    from diffusers import Cosmos3OmniTransformer
    # vision only: one packed sequence (no batch axis) of a 3-token text prefix, then each item's 1x2x2 patch grid
    model = Cosmos3OmniTransformer(head_dim=8, hidden_size=32, intermediate_size=64, latent_channel=4,
                                   latent_patch_size=2, num_attention_heads=4, num_hidden_layers=2,
                                   num_key_value_heads=2, patch_latent_dim=16, vocab_size=32, rope_axes_dim=(2, 1, 1))
    text, vision = 3, 4 * batch
    length = text + vision
    indexes = torch.arange(text, length)
    return model, dict(input_ids=torch.randint(0, 32, (text,)), text_indexes=torch.arange(text),
                       position_ids=torch.arange(length)[None].repeat(3, 1), und_len=text, sequence_length=length,
                       vision_tokens=[_rand(1, 4, 1, 4, 4) for _ in range(batch)],
                       vision_token_shapes=[(1, 2, 2)] * batch, vision_sequence_indexes=indexes,
                       vision_mse_loss_indexes=indexes, vision_timesteps=torch.rand(vision) * 1000,
                       vision_noisy_frame_indexes=[torch.tensor([0])] * batch, return_dict=False)


REST = {
    "JoyImageEditPlusTransformer3DModel": joyimage_edit_plus,
    "BriaFibo2Transformer2DModel": bria_fibo2,
    "MiniMaxMusic3Transformer1DModel": minimax_music3,
    "SanaWMLTX2RefinerTransformer3DModel": sana_wm_refiner,
    "SanaWMTransformer3DModel": sana_wm,
    "MiniMaxH3Transformer3DModel": minimax_h3,
    # its NABLA attention runs flex attention eagerly, counted as dense attention by analysis.flop_counter
    "Kandinsky6SRTransformer3DModel": kandinsky6_sr,
    "AnyFlowFARTransformer3DModel": anyflow_far,
    "WanAnimate2Transformer3DModel": wan_animate2,
    # its decoder layers take packed (tokens, hidden) streams without a batch axis: routed once per call
    "Cosmos3OmniTransformer": cosmos3_omni,
    # width-only: no block is a residual skip (WIDTH_ONLY says why)
    "RFD4ProteinaTransformer": rfd4_proteina,
}

#: tiny configs whose class's forward runs but that the sweep cannot check yet (see the reasons)
REST_PENDING = {}
REST_PENDING_REASONS = {}

#: swept classes whose blocks are found but none can be skipped, with why: the sweep checks width savings only
WIDTH_ONLY = {
    "RFD4ProteinaTransformer": "width-only, none skippable: each trunk layer computes ((x*m + attn(x*m))*m + ...)*m "
                               "with the padding mask m, so its output is not a residual update of its input x "
                               "(skipping is x*m, equal to x only for already-masked streams, which the residual "
                               "analysis cannot prove; the trunk's first input, values + s_cycle_proj(...), is not "
                               "masked, so taking the mask multiply as the identity would change padded tokens when "
                               "layers are skipped); tiny config with backbone + local-latent features only",
}


#: DiT classes without a tiny config here, each with what writing one involves (more than "inputs specific to it")
NOT_WRITTEN_REASONS = {}

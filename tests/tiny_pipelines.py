"""Real diffusers pipelines built offline from tiny random parts (no downloads): DiT (class-conditional), PixArt-Alpha
(T5 text encoder) and Flux (CLIP + T5). Tokenizers are word-level ones built with the ``tokenizers`` package and
wrapped in ``transformers.PreTrainedTokenizerFast``; text encoders are tiny ``transformers`` configs."""
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, PixArtAlphaPipeline, PixArtTransformer2DModel)

WORDS = ["a", "cat", "dog", "photo", "of", "red", "blue", "on", "the", "grass", "blurry", "ugly"]


def word_tokenizer(max_length: int):
    """A word-level tokenizer over :data:`WORDS` (ids 0..3 special: pad, eos, unk, bos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "</s>", "<unk>", "<s>"] + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   bos_token="<s>", model_max_length=max_length)


def tiny_t5(d_model: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(WORDS) + 4, d_model=d_model, d_kv=8, d_ff=24, num_layers=1,
                                   num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                   eos_token_id=1, decoder_start_token_id=0)).eval()


def tiny_clip(hidden: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(vocab_size=len(WORDS) + 4, hidden_size=hidden, intermediate_size=24,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                        projection_dim=hidden, pad_token_id=0, bos_token_id=3,
                                        eos_token_id=1)).eval()


def tiny_vae(**overrides):
    config = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                  up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                  norm_num_groups=4, sample_size=16)
    config.update(overrides)
    return AutoencoderKL(**config).eval()


def dit_pipeline(seed: int = 0) -> DiTPipeline:
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler())


def pixart_pipeline(seed: int = 0) -> PixArtAlphaPipeline:
    """Call with ``height=16, width=16, use_resolution_binning=False, clean_caption=False, max_sequence_length=8``."""
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                           num_layers=3, cross_attention_dim=16, sample_size=8, patch_size=2,
                                           caption_channels=16, use_additional_conditions=False).eval()
    return PixArtAlphaPipeline(tokenizer=word_tokenizer(8), text_encoder=tiny_t5(16), vae=tiny_vae(),
                               transformer=transformer, scheduler=DDIMScheduler())


def flux_pipeline(seed: int = 0) -> FluxPipeline:
    """Call with ``height=16, width=16, max_sequence_length=8``."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                         attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                         pooled_projection_dim=16, axes_dims_rope=(2, 2, 4)).eval()
    vae = tiny_vae(shift_factor=0.1, scaling_factor=1.5)
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=tiny_clip(16),
                        tokenizer=word_tokenizer(8), text_encoder_2=tiny_t5(16), tokenizer_2=word_tokenizer(8),
                        transformer=transformer)

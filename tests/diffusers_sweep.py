"""Tiny configs of the DiT classes in diffusers' ``models/transformers/`` (0.42), each with one forward's inputs.

``SWEEP``: class name -> builder ``(batch) -> (model, example_inputs)``; the ten classes of ``zoo.py`` come from
there. ``LEFT_OUT``: every other class of the package, with why it is not in the sweep. ``all_classes()`` lists
the package's model classes, so a test can check that each one is either swept or left out with a reason.
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import torch

import zoo
from diffusers_sweep_more import MORE, MORE_PENDING, MORE_PENDING_REASONS
from diffusers_sweep_rest import NOT_WRITTEN_REASONS


def _rand(*shape):
    return torch.randn(*shape)


def _steps(batch):
    return torch.randint(0, 1000, (batch,))


def aura_flow(batch):
    from diffusers import AuraFlowTransformer2DModel
    model = AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2,
                                       num_single_dit_layers=2, attention_head_dim=8, num_attention_heads=2,
                                       caption_projection_dim=16, joint_attention_dim=12, out_channels=4,
                                       pos_embed_max_size=16)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), return_dict=False)


def latte(batch):
    from diffusers import LatteTransformer3DModel
    model = LatteTransformer3DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                    num_attention_heads=2, caption_channels=12, in_channels=4, cross_attention_dim=16,
                                    out_channels=8, num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                                    norm_elementwise_affine=False, norm_eps=1e-6, video_length=2)
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), enable_temporal_attentions=True, return_dict=False)


def lumina_next(batch):
    from diffusers import LuminaNextDiT2DModel
    model = LuminaNextDiT2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                                 num_attention_heads=3, num_kv_heads=1, multiple_of=16, norm_eps=1e-5,
                                 learn_sigma=False, qk_norm=True, cross_attention_dim=12, scaling_factor=1.0)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=torch.rand(batch), encoder_mask=torch.ones(batch, 5),
                       image_rotary_emb=_rand(64, 64, 4), cross_attention_kwargs={}, return_dict=False)


def lumina2(batch):
    from diffusers import Lumina2Transformer2DModel
    model = Lumina2Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2,
                                      num_refiner_layers=1, num_attention_heads=3, num_kv_heads=1, multiple_of=2,
                                      norm_eps=1e-5, scaling_factor=1.0, axes_dim_rope=(4, 2, 2),
                                      axes_lens=(32, 32, 32), cap_feat_dim=12)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=torch.rand(batch), encoder_attention_mask=torch.ones(batch, 5, dtype=torch.bool),
                       return_dict=False)


def allegro(batch):
    from diffusers import AllegroTransformer3DModel
    model = AllegroTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                      num_layers=2, cross_attention_dim=16, sample_width=8, sample_height=8,
                                      sample_frames=2, caption_channels=12)
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), return_dict=False)


def cogview4(batch):
    from diffusers import CogView4Transformer2DModel
    model = CogView4Transformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                       num_attention_heads=2, out_channels=4, text_embed_dim=12, time_embed_dim=8,
                                       condition_dim=4)
    size = torch.tensor([[64, 64]]).repeat(batch, 1)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), original_size=size, target_size=size,
                       crop_coords=torch.zeros(batch, 2, dtype=torch.long), return_dict=False)


def mochi(batch):
    from diffusers import MochiTransformer3DModel
    model = MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                    pooled_projection_dim=16, in_channels=4, qk_norm="rms_norm", text_embed_dim=16,
                                    time_embed_dim=8, activation_fn="swiglu", max_sequence_length=5)
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), encoder_hidden_states=_rand(batch, 5, 16),
                       timestep=_steps(batch), encoder_attention_mask=torch.ones(batch, 5, dtype=torch.bool),
                       return_dict=False)


def hunyuan_video(batch):
    from diffusers import HunyuanVideoTransformer3DModel
    model = HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=2,
                                           patch_size_t=1, guidance_embeds=True, text_embed_dim=12,
                                           pooled_projection_dim=10, rope_axes_dim=(2, 2, 4))
    return model, dict(hidden_states=_rand(batch, 4, 1, 8, 8), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), pooled_projections=_rand(batch, 10),
                       encoder_attention_mask=torch.ones(batch, 5), guidance=_steps(batch).float(), return_dict=False)


def _flux_like(cls, img=16, txt=5, ids=3, **config):
    def build(batch):
        model = cls(**config)
        inputs = dict(hidden_states=_rand(batch, img, config["in_channels"]), encoder_hidden_states=_rand(batch, txt, 12),
                      timestep=torch.rand(batch), img_ids=_rand(img, ids), txt_ids=_rand(txt, ids), return_dict=False)
        return model, inputs
    return build


def chroma(batch):
    from diffusers import ChromaTransformer2DModel
    return _flux_like(ChromaTransformer2DModel, patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=(2, 2, 4),
                      approximator_num_channels=8, approximator_hidden_dim=16, approximator_layers=1)(batch)


def bria(batch):
    from diffusers import BriaTransformer2DModel
    return _flux_like(BriaTransformer2DModel, patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, axes_dims_rope=[2, 2, 4])(batch)


def longcat_image(batch):
    from diffusers import LongCatImageTransformer2DModel
    return _flux_like(LongCatImageTransformer2DModel, patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                      attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=12,
                      axes_dims_rope=[2, 2, 4])(batch)


def ovis_image(batch):
    from diffusers import OvisImageTransformer2DModel
    return _flux_like(OvisImageTransformer2DModel, patch_size=1, in_channels=8, out_channels=8, num_layers=2,
                      num_single_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                      axes_dims_rope=(2, 2, 4))(batch)


def flux2(batch):
    from diffusers import Flux2Transformer2DModel
    model, inputs = _flux_like(Flux2Transformer2DModel, ids=4, patch_size=1, in_channels=8, num_layers=2,
                               num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
                               joint_attention_dim=12, timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                               guidance_embeds=True)(batch)
    return model, dict(inputs, guidance=torch.rand(batch))


def ltx(batch):
    from diffusers import LTXVideoTransformer3DModel
    model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=8,
                                       cross_attention_dim=16, num_layers=2, caption_channels=12)
    return model, dict(hidden_states=_rand(batch, 16, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), encoder_attention_mask=torch.ones(batch, 5), num_frames=1, height=4,
                       width=4, return_dict=False)


def _wan_like(cls, **extra):
    def build(batch):
        model = cls(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                    text_dim=12, freq_dim=16, ffn_dim=40, num_layers=2, rope_max_seq_len=32, **extra)
        return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), timestep=_steps(batch),
                           encoder_hidden_states=_rand(batch, 5, 12), return_dict=False)
    return build


def skyreels_v2(batch):
    from diffusers import SkyReelsV2Transformer3DModel
    return _wan_like(SkyReelsV2Transformer3DModel)(batch)


def chronoedit(batch):
    from diffusers import ChronoEditTransformer3DModel
    return _wan_like(ChronoEditTransformer3DModel)(batch)


def wan_vace(batch):
    from diffusers import WanVACETransformer3DModel
    model, inputs = _wan_like(WanVACETransformer3DModel, vace_layers=[0], vace_in_channels=4)(batch)
    return model, dict(inputs, control_hidden_states=_rand(batch, 4, 2, 8, 8))


def cogview3plus(batch):
    from diffusers import CogView3PlusTransformer2DModel
    model = CogView3PlusTransformer2DModel(patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                           num_attention_heads=2, out_channels=4, text_embed_dim=12, time_embed_dim=8,
                                           condition_dim=4, pos_embed_max_size=8, sample_size=8)
    size = torch.tensor([[64, 64]]).repeat(batch, 1)
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), original_size=size, target_size=size,
                       crop_coords=torch.zeros(batch, 2, dtype=torch.long), return_dict=False)


def sana_video(batch):
    from diffusers import SanaVideoTransformer3DModel
    model = SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                        num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                        cross_attention_dim=16, caption_channels=12, sample_size=8)
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), encoder_hidden_states=_rand(batch, 5, 12),
                       timestep=_steps(batch), return_dict=False)


def cosmos(batch):
    from diffusers import CosmosTransformer3DModel
    model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                     num_layers=2, text_embed_dim=12, adaln_lora_dim=4, max_size=(4, 16, 16),
                                     concat_padding_mask=False, rope_scale=(1.0, 1.0, 1.0),
                                     extra_pos_embed_type=None)  # Predict2-style; see NOTES
    return model, dict(hidden_states=_rand(batch, 4, 2, 8, 8), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), return_dict=False)


def hunyuan_image(batch):
    from diffusers import HunyuanImageTransformer2DModel
    model = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           num_layers=2, num_single_layers=2, num_refiner_layers=1, patch_size=(2, 2),
                                           text_embed_dim=12, rope_axes_dim=(4, 4))
    return model, dict(hidden_states=_rand(batch, 4, 8, 8), timestep=_steps(batch).float(),
                       encoder_hidden_states=_rand(batch, 5, 12), encoder_attention_mask=torch.ones(batch, 5),
                       return_dict=False)


#: classes whose builders are zoo.py's (test_transform.py checks them on every run)
ZOO_CLASSES = ("DiTTransformer2DModel", "PixArtTransformer2DModel", "SD3Transformer2DModel", "FluxTransformer2DModel",
               "QwenImageTransformer2DModel", "HunyuanDiT2DModel", "SanaTransformer2DModel", "WanTransformer3DModel",
               "CogVideoXTransformer3DModel")


def _from_zoo(name):
    def build(batch):
        return zoo.ARCHITECTURES[name](seed=0, batch=batch)
    return build


SWEEP = {
    "DiTTransformer2DModel": _from_zoo("dit"),
    "PixArtTransformer2DModel": _from_zoo("pixart"),
    "SD3Transformer2DModel": _from_zoo("sd3"),
    "FluxTransformer2DModel": _from_zoo("flux"),
    "QwenImageTransformer2DModel": _from_zoo("qwen_image"),
    "HunyuanDiT2DModel": _from_zoo("hunyuan_dit"),
    "SanaTransformer2DModel": _from_zoo("sana"),
    "WanTransformer3DModel": _from_zoo("wan"),
    "CogVideoXTransformer3DModel": _from_zoo("cogvideox"),
    "AuraFlowTransformer2DModel": aura_flow,
    "LatteTransformer3DModel": latte,
    "LuminaNextDiT2DModel": lumina_next,
    "Lumina2Transformer2DModel": lumina2,
    "AllegroTransformer3DModel": allegro,
    "CogView4Transformer2DModel": cogview4,
    "HunyuanVideoTransformer3DModel": hunyuan_video,
    "ChromaTransformer2DModel": chroma,
    "BriaTransformer2DModel": bria,
    "LongCatImageTransformer2DModel": longcat_image,
    "OvisImageTransformer2DModel": ovis_image,
    "Flux2Transformer2DModel": flux2,
    "LTXVideoTransformer3DModel": ltx,
    "SkyReelsV2Transformer3DModel": skyreels_v2,
    "ChronoEditTransformer3DModel": chronoedit,
    "WanVACETransformer3DModel": wan_vace,
    "CogView3PlusTransformer2DModel": cogview3plus,
    "SanaVideoTransformer3DModel": sana_video,
    "HunyuanImageTransformer2DModel": hunyuan_image,
    "MochiTransformer3DModel": mochi,
    "CosmosTransformer3DModel": cosmos,
    **MORE,
}

#: tiny configs written but not yet passing (or not yet run) in this sweep: not swept, listed as left out
PENDING = {
    **MORE_PENDING,
}
#: why each PENDING class is not swept with the tiny config written here
PENDING_REASONS = {
    **MORE_PENDING_REASONS,
}

NOT_A_DIT = {
    "PriorTransformer": "a CLIP-embedding prior (Kandinsky/unCLIP), no image token stream",
    "T5FilmDecoder": "a music spectrogram decoder (FiLM-conditioned T5), not a diffusion transformer on latents",
    "TransformerTemporalModel": "a temporal adapter inside UNets (AnimateDiff), not a backbone",
    "MiniMaxMusic3RVQDepthDecoder": "a codec depth decoder, not a diffusion transformer",
}

#: classes not swept yet: each is a DiT whose tiny config and inputs this sweep does not write yet
NO_TINY_CONFIG_YET = "DiT without a tiny config in this sweep yet (inputs specific to the class)"


def all_classes() -> dict[str, str]:
    """Every model class defined in ``diffusers.models.transformers`` -> its module name."""
    import diffusers.models.transformers as package
    from diffusers.models.modeling_utils import ModelMixin
    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if inspect.isclass(value) and issubclass(value, ModelMixin) and value.__module__ == module.__name__:
                found[name] = info.name
    return found


def left_out() -> dict[str, str]:
    """Classes of the package not in ``SWEEP``, each with the reason."""
    return {name: NOT_A_DIT.get(name, PENDING_REASONS.get(name, NOT_WRITTEN_REASONS.get(name, NO_TINY_CONFIG_YET)))
            for name in sorted(all_classes()) if name not in SWEEP}


def first_tensor(out):
    """The main output as one tensor (a per-sample list, as Z-Image returns, is stacked)."""
    out = zoo.first_output(out)
    return torch.stack(list(out)) if isinstance(out, (list, tuple)) else out


#: buckets of the sweep: the two fractions the coverage table reports (fewer buckets: fewer profiling forwards)
SWEEP_BUCKETS = (0.25, 1.0)


def measure(name: str, batch: int = 2) -> dict:
    """Transform the tiny ``name`` and measure it: blocks found, FFN sites, |untrained - dense|, executed FLOP
    fractions with every block skipped and at width 1/4, and what was degraded (block notes, left-dense modules)."""
    import elastic_compile as ec
    from elastic_compile.state import state_of
    torch.manual_seed(0)
    model, inputs = {**PENDING, **SWEEP}[name](batch)
    model.eval()
    with torch.no_grad():
        dense = first_tensor(model(**inputs)).clone()
    ec.transform(model, ec.ElasticConfig(width_buckets=SWEEP_BUCKETS), example_inputs=inputs)
    state = state_of(model)
    with torch.no_grad():
        error = float((first_tensor(model(**inputs)) - dense).abs().max())
    # Executed FLOPs counted on the real forward under each plan (what ec.stats reports; counted directly here, as
    # stats' shape-only profiling costs seconds per tiny model).
    from elastic_compile.analysis.flop_counter import flop_counter
    counts = {}
    for key, plan in (("dense", dict(skip=False, width=1.0)), ("skip_all", dict(skip=True)),
                      ("width_quarter", dict(skip=False, width=0.25))):
        with torch.no_grad(), ec.force(model, **plan), flop_counter() as counter:
            model(**inputs)
        counts[key] = counter.get_total_flops()
    fractions = {key: counts[key] / counts["dense"] for key in ("skip_all", "width_quarter")}
    report = ec.report(model)
    degraded = sorted({note for b in report.blocks for note in b.notes})
    degraded += [f"{path}: {reason}" for path, reason in sorted(report.left_dense.items())]
    return dict(name=name, blocks=len(state.specs), skippable=sum(s.skippable for s in state.specs),
                ffn_sites=sum(len(s.sites) for s in state.specs), dense_error=error,
                dense_scale=float(dense.abs().max()), degraded=degraded, **fractions)

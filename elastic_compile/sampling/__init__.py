"""The class-conditional sampling loop (diffusers schedulers) and the hooks it calls into a stateful denoiser.

``sample(denoiser, scheduler, labels, config)`` works on the dense model, an elastic model, a model with diffusers
cache hooks and an exported runtime alike; see :mod:`.loop` and :mod:`.hooks`.
"""
from .hooks import (BRANCH_COND, BRANCH_COND_UNCOND, BRANCH_UNCOND, DiffusersCacheHooks, SamplerHooks,
                    StepInfo)
from .loop import CFG_MODES, SamplingConfig, denoiser_output, initial_noise, sample

__all__ = ["BRANCH_COND", "BRANCH_COND_UNCOND", "BRANCH_UNCOND", "CFG_MODES", "DiffusersCacheHooks",
           "SamplerHooks", "SamplingConfig", "StepInfo", "denoiser_output", "initial_noise", "sample"]

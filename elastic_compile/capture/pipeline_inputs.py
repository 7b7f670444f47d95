"""``capture_inputs(pipe, **call)``: the keyword arguments a pipeline's transformer is called with, from one
pipeline call, as the example inputs ``transform`` and ``export`` take.

Why: a diffusers user holds a pipeline, not the transformer's inputs (latents, timestep, text embeddings, ids,
``added_cond_kwargs``...). The pipeline builds them; a forward pre-hook on ``pipe.transformer`` records the first
call's arguments (positional ones named by the forward's signature, tensors detached and cloned) and stops the
pipeline right there, so the capture costs one denoiser call's preparation and no denoising loop.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..errors import ConfigError


class _Captured(Exception):
    """Raised from the hook to leave the pipeline call once the inputs are recorded."""


def capture_inputs(pipe, component: str = "transformer", **call) -> dict:
    """Run ``pipe(**call)`` until it calls ``pipe.<component>`` and return that call's arguments by name."""
    module = getattr(pipe, component, None)
    if not isinstance(module, nn.Module):
        raise ConfigError(f"a pipeline with a torch module as .{component}", f"{type(module).__name__}",
                          "Pass a diffusers pipeline (or name its denoiser with component=..., e.g. 'unet').")
    parameters = list(inspect.signature(type(module).forward).parameters)[1:]
    captured: dict = {}

    def hook(_module, args, kwargs):
        named = dict(zip(parameters, args))
        named.update(kwargs)
        captured.update(pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), named))
        raise _Captured

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(**call)
    except _Captured:
        pass
    finally:
        handle.remove()
    if not captured:
        raise ConfigError(f"a pipeline call that calls pipe.{component}", "a call that never did",
                          "Pass arguments that run at least one denoising step (num_inference_steps >= 1).")
    return captured

"""Which block arguments a router reads, and how (pooled tokens, a vector, or a scalar per sample)."""
from __future__ import annotations

import torch

from .spec import RouterFeature

SCALAR_FEATURES = 32  # sinusoidal features of a per-sample scalar (timestep, sigma, ...)


def router_features(arguments: dict, stream_inputs: list[str], batch: int) -> list[RouterFeature]:
    """Router inputs of a block from one recorded call.

    - the block's hidden-state streams (its residual inputs): mean over tokens -> (B, D);
    - per-sample conditioning: float (B, C) vectors, (B, ..., C) tensors pooled to (B, C), and per-sample
      scalars (B,) such as timesteps (sinusoidal features). Arguments named like masks, tensors without a
      leading batch dimension (rotary tables), complex and boolean tensors are not read.
    """
    features = [RouterFeature(name, "pooled", int(arguments[name].shape[-1])) for name in stream_inputs]
    for name, value in arguments.items():
        if name in stream_inputs or not isinstance(value, torch.Tensor) or "mask" in name.lower():
            continue
        if value.ndim == 0 or value.shape[0] != batch or value.is_complex() or value.dtype == torch.bool:
            continue
        if value.ndim == 1:
            features.append(RouterFeature(name, "scalar", SCALAR_FEATURES))
        elif not value.is_floating_point():
            continue
        elif value.ndim == 2:
            features.append(RouterFeature(name, "vector", int(value.shape[1])))
        else:
            features.append(RouterFeature(name, "pooled", int(value.shape[-1])))
    return features

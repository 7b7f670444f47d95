"""Width-sliced execution of the projections of an FFN site.

``install_sliced_forward`` gives an ``nn.Linear`` / ``nn.ConvNd`` an instance-level forward that, while its
block's ``WidthControl.bucket`` is set, runs with its weights cut to that bucket: real narrower GEMMs/convs.
Contiguous cuts are views (no copy); interleaved ones (GLU halves, Flux's concatenated out-projection) use a
precomputed index. Parameters, their names and the state dict are unchanged.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..analysis.spec import ParamSlice

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


class WidthControl:
    """Per-block switch read by its sliced modules.

    ``bucket``: index of the width bucket to run (None = dense). ``unit_masks``: per FFN site, a (B, hidden)
    multiplicative mask applied at the out-projection input (soft widths while training routers).
    """

    def __init__(self):
        self.bucket: int | None = None
        self.unit_masks: dict[int, torch.Tensor] | None = None


@dataclass(frozen=True)
class Cut:
    """One parameter cut of one site: which slice, which site, and the unit count of every bucket."""

    slice: ParamSlice
    site: int
    units: tuple[int, ...]
    out_projection: bool


def supported_projection(module: nn.Module) -> str | None:
    """None when ``module`` can be sliced, else why not."""
    if isinstance(module, nn.Linear):
        return None if type(module).forward is nn.Linear.forward else f"{type(module).__name__} overrides forward"
    for base in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        if isinstance(module, base):
            return None if type(module).forward is base.forward else f"{type(module).__name__} overrides forward"
    return f"the parameter belongs to {type(module).__name__}, not to a Linear/Conv module"


def install_sliced_forward(module: nn.Module, control: WidthControl, cuts: list[Cut], num_buckets: int) -> None:
    """Make ``module`` run narrower while ``control.bucket`` is set. Idempotent per module."""
    selectors: dict[tuple[str, int], list] = {}
    for cut in cuts:
        size = getattr(module, cut.slice.attribute).shape[cut.slice.dim]
        per_bucket = []
        for bucket in range(num_buckets):
            index = cut.slice.indices(cut.units[bucket])
            if index == list(range(index[0], index[0] + len(index))):
                per_bucket.append((index[0], len(index)))
            elif len(index) == size:
                per_bucket.append(None)
            else:
                name = f"_elastic_index_{cut.slice.attribute}_{cut.slice.dim}_{bucket}"
                module.register_buffer(name, torch.tensor(index, dtype=torch.long), persistent=False)
                per_bucket.append(name)
        selectors[(cut.slice.attribute, cut.slice.dim)] = per_bucket
    module._elastic_control = control
    module._elastic_selectors = selectors
    module._elastic_out_cuts = [c for c in cuts if c.out_projection]
    if isinstance(module, nn.Linear):
        module.forward = types.MethodType(_sliced_linear_forward, module)
    else:
        module.forward = types.MethodType(_sliced_conv_forward, module)


def uninstall_sliced_forward(module: nn.Module) -> None:
    for attr in ("forward", "_elastic_control", "_elastic_selectors", "_elastic_out_cuts"):
        module.__dict__.pop(attr, None)
    for name in [n for n in module._buffers if n.startswith("_elastic_index_")]:
        del module._buffers[name]


def _cut_param(module: nn.Module, attribute: str, bucket: int):
    value = getattr(module, attribute)
    if value is None:
        return None
    for (cut_attribute, dim), per_bucket in module._elastic_selectors.items():
        selector = per_bucket[bucket]
        if cut_attribute != attribute or selector is None:
            continue
        if isinstance(selector, tuple):
            value = value.narrow(dim, selector[0], selector[1])
        else:
            value = value.index_select(dim, getattr(module, selector))
    return value


def _masked_input(module: nn.Module, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    masks = module._elastic_control.unit_masks
    if not masks or not module._elastic_out_cuts:
        return x
    channels = x.shape[channel_dim]
    full = torch.ones(x.shape[0], channels, dtype=x.dtype, device=x.device)
    for cut in module._elastic_out_cuts:
        if cut.site in masks:
            start = cut.slice.unit_starts[0]
            mask = masks[cut.site].to(x.dtype)
            full = torch.cat([full[:, :start], mask, full[:, start + mask.shape[1]:]], dim=1)
    shape = [x.shape[0]] + [1] * (x.ndim - 1)
    shape[channel_dim] = channels
    return x * full.reshape(shape)


def _sliced_linear_forward(self, x):
    bucket = self._elastic_control.bucket
    x = _masked_input(self, x, x.ndim - 1)
    if bucket is None:
        return F.linear(x, self.weight, self.bias)
    return F.linear(x, _cut_param(self, "weight", bucket), _cut_param(self, "bias", bucket))


def _sliced_conv_forward(self, x):
    bucket = self._elastic_control.bucket
    x = _masked_input(self, x, 1)
    weight = self.weight if bucket is None else _cut_param(self, "weight", bucket)
    bias = self.bias if bucket is None else _cut_param(self, "bias", bucket)
    groups = self.groups if self.groups == 1 else weight.shape[0] // (self.out_channels // self.groups)
    padding = self.padding
    if self.padding_mode != "zeros":
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = 0
    return _CONV_FN[weight.ndim - 2](x, weight, bias, self.stride, padding, self.dilation, groups)

"""Pass: make each FFN site of a block run at the configured width buckets by slicing its projections.

Matches: the FFN sites the analysis found (``analysis/ffn.py``) whose projections are plain ``nn.Linear`` /
``nn.ConvNd`` modules (no overridden ``forward``); other sites are left dense and the spec notes why.

Installs: on every projection module of a kept site, an instance-level ``forward`` that, while the block's
:class:`~elastic_compile.nn.width.WidthControl` selects a bucket, runs with its weights cut to that bucket: real
narrower GEMMs/convs. Contiguous cuts are views (no copy); interleaved ones (GLU halves, Flux's concatenated
out-projection) use a precomputed index. With ``unit_masks`` set (soft training, device routing's narrower
samples), the out-projection's input is multiplied by a per-sample mask over the units instead. Parameters, their
names and the state dict are unchanged; :func:`remove_elastic_mlps` undoes it.

Guarantee: with ``control.bucket = None`` every module runs its original computation; with bucket ``b`` the site
computes exactly the dense site with units ``>= units(b)`` removed (``transform``'s verify step checks this
against the masked dense graph and removes the widths of a block that fails).
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..analysis.spec import BlockSpec, ParamSlice
from ..nn.width import WidthControl

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def make_mlps_elastic(block: nn.Module, spec: BlockSpec, control: WidthControl, buckets: tuple[float, ...]) -> None:
    """Install sliced forwards for every site of ``spec``; drops (and notes) sites that cannot be sliced."""
    kept, cuts_by_module = [], {}
    for site in spec.sites:
        units = tuple(site.units_at(b) for b in buckets)
        problems, site_cuts = [], []
        for piece in site.all_slices():
            module = block.get_submodule(piece.module)
            problem = supported_projection(module)
            if problem:
                problems.append(f"{piece.param}: {problem}")
            site_cuts.append((piece.module, Cut(piece, len(kept), units, piece is site.out_projection)))
        if problems:
            spec.notes.append(f"FFN {site.name} not elastic: {problems[0]}")
            continue
        kept.append(site)
        for module_name, cut in site_cuts:
            cuts_by_module.setdefault(module_name, []).append(cut)
    spec.sites = kept
    for module_name, cuts in cuts_by_module.items():
        install_sliced_forward(block.get_submodule(module_name), control, cuts, len(buckets))


def remove_elastic_mlps(block: nn.Module, spec: BlockSpec, reason: str) -> None:
    """Give every site of ``spec`` its dense forward back and drop the sites from the spec (noting ``reason``)."""
    for site in spec.sites:
        for piece in site.all_slices():
            uninstall_sliced_forward(block.get_submodule(piece.module))
    spec.notes.append(f"FFN widths disabled: {reason}")
    spec.sites = []


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
    # one mask row per sample; a single row (a block routed once per call) covers every row of x
    rows = next(iter(masks.values())).shape[0]
    full = torch.ones(rows, channels, dtype=x.dtype, device=x.device)
    for cut in module._elastic_out_cuts:
        if cut.site in masks:
            start = cut.slice.unit_starts[0]
            mask = masks[cut.site].to(x.dtype)
            full = torch.cat([full[:, :start], mask, full[:, start + mask.shape[1]:]], dim=1)
    shape = [rows] + [1] * (x.ndim - 1)
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

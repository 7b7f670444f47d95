"""Pass: make each FFN site of a block run at the configured width buckets by slicing its projections.

Guarantee: with ``control.bucket = None`` every module runs its original computation; with bucket ``b`` the
site computes exactly the dense site with units ``>= units(b)`` removed (the verify step checks this against the
masked dense graph). Sites whose parameters do not belong to plain Linear/Conv modules are left dense and
reported.
"""
from __future__ import annotations

from torch import nn

from ..analysis.spec import BlockSpec
from ..nn.sliced import Cut, WidthControl, install_sliced_forward, supported_projection


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

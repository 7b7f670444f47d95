"""Architectures nobody wrote elastic_compile against: SwiGLU, fused GEGLU, parallel blocks, custom linears."""
import copy

import pytest
import torch

import elastic_compile as ec
from elastic_compile.state import state_of
from unseen import build


@pytest.mark.parametrize("mlp,parallel", [("swiglu", False), ("geglu", False), ("swiglu", True), ("geglu", True)])
def test_gated_ffns_become_elastic_and_exact(mlp, parallel):
    model, inputs = build(mlp, parallel)
    original = copy.deepcopy(model)
    ec.transform(model, example_inputs=inputs)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), original(**inputs), atol=1e-5, rtol=1e-5)
    state = state_of(model)
    for spec in state.specs:
        assert len(spec.sites) == 1 and spec.sites[0].hidden == 48 and "gated product" in spec.sites[0].activation
    # Forced width equals the original with the dropped units' out-projection columns zeroed.
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for spec in state.specs:
            site = spec.sites[0]
            dropped = state.permutations[(spec.index, site.name)][site.units_at(0.5):]
            reference.get_submodule(spec.path).get_parameter(site.out_projection.param).index_fill_(1, dropped, 0.0)
        with ec.force(model, skip=False, width=0.5):
            torch.testing.assert_close(model(**inputs), reference(**inputs), atol=1e-5, rtol=1e-5)


def test_ffn_on_custom_linear_modules_is_reported_and_block_still_skippable():
    model, inputs = build("custom")
    ec.transform(model, example_inputs=inputs)
    report = ec.report(model)
    for block in report.blocks:
        assert block.skippable and not block.ffn_sites and block.router_params > 0
        assert any("PlainLinearSubclass overrides forward" in note for note in block.notes)
    with torch.no_grad(), ec.force(model, skip={1}):
        model(**inputs)
    assert [d.run for d in ec.stats(model).decisions[1]] == [False, False]

"""Neuron ordering and slicing rules (property tests where inputs vary)."""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import elastic_compile as ec
from elastic_compile.analysis.spec import ParamSlice
from elastic_compile.passes.order_neurons import unit_importance
from elastic_compile.state import state_of
from zoo import ARCHITECTURES, first_output


@given(hidden=st.integers(1, 12), offset=st.integers(0, 5), halves=st.integers(1, 3), data=st.data())
def test_param_slice_permutation_and_prefix_indices(hidden, offset, halves, data):
    starts = tuple(offset + i * hidden for i in range(halves))
    size = offset + halves * hidden + data.draw(st.integers(0, 3))
    piece = ParamSlice("w", 0, starts, ((0, offset),) if offset else ())
    order = data.draw(st.permutations(range(hidden)))
    index = piece.permutation(order, size)
    assert sorted(index) == list(range(size))
    for s in starts:
        assert [index[s + j] - s for j in range(hidden)] == list(order)
    units = data.draw(st.integers(1, hidden))
    kept = piece.indices(units)
    assert kept == sorted(kept) and len(kept) == offset + halves * units
    assert all(i < offset or any(s <= i < s + units for s in starts) for i in kept)


@settings(max_examples=12, deadline=None)
@given(skip=st.sets(st.integers(0, 2)), width=st.sampled_from([0.25, 0.5, 0.75, 1.0]))
def test_any_forced_plan_is_deterministic_and_counted(skip, width):
    model, inputs = _transformed()
    with torch.no_grad(), ec.force(model, skip=skip, width=width):
        a = first_output(model(**inputs))
        stats = ec.stats(model)
        b = first_output(model(**inputs))
    assert torch.equal(a, b)
    for i, block in enumerate(stats.decisions):
        assert all(d.run == (i not in skip) and d.width == (None if i in skip else width) for d in block)
    expected_drop = len(skip) / 3
    assert stats.executed_flops_fraction <= 1.0 - 0.8 * expected_drop + 1e-9 or not skip


_MODEL = {}


def _transformed():
    if "m" not in _MODEL:
        model, inputs = ARCHITECTURES["reference_dit"]()
        _MODEL["m"] = (ec.transform(model, example_inputs=inputs), inputs)
    return _MODEL["m"]


def test_activation_importance_keeps_the_most_active_units():
    model, inputs = ARCHITECTURES["reference_dit"](batch=4)
    original = copy.deepcopy(model)
    calibration = [ARCHITECTURES["reference_dit"](seed=s, batch=4)[1] for s in (1, 2)]
    ec.transform(model, example_inputs=inputs, calibration_inputs=calibration)
    with torch.no_grad():
        torch.testing.assert_close(first_output(model(**inputs)), first_output(original(**inputs)), atol=1e-5, rtol=1e-5)
    state = state_of(model)
    site = state.specs[0].sites[0]
    # Measure the original block's fc2 input on the calibration data and score units as the pass should.
    seen = []
    hook = original.blocks[0].mlp.fc2.register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        for c in calibration:
            original(**c)
    hook.remove()
    mean_abs = torch.cat(seen).mean(0)
    score = mean_abs * original.blocks[0].mlp.fc2.weight.norm(dim=0)
    order = state.permutations[(0, site.name)]
    assert torch.equal(order, torch.argsort(score, descending=True, stable=True))
    weight_order = torch.argsort(unit_importance(original.blocks[0], site), descending=True, stable=True)
    assert not torch.equal(order, weight_order)  # data changed the order


def test_weight_importance_orders_units_by_norm_product():
    model, inputs = ARCHITECTURES["dit"]()
    original = copy.deepcopy(model)
    ec.transform(model, example_inputs=inputs)
    state = state_of(model)
    site = state.specs[1].sites[0]
    block = original.transformer_blocks[1]
    score = block.ff.net[2].weight.norm(dim=0) * block.ff.net[0].proj.weight.norm(dim=1)
    assert torch.equal(state.permutations[(1, site.name)], torch.argsort(score, descending=True, stable=True))
    permuted = model.transformer_blocks[1].ff.net[2].weight.norm(dim=0) * model.transformer_blocks[1].ff.net[0].proj.weight.norm(dim=1)
    assert torch.all(permuted[:-1] >= permuted[1:] - 1e-6)

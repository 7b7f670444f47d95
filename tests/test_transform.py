"""transform() on every supported architecture: dense reproduction, widths, skips, FLOPs (issue 2)."""
import copy
import inspect

import pytest
import torch
from elastic_compile.analysis.flop_counter import flop_counter

import elastic_compile as ec
from elastic_compile.state import state_of
from zoo import first_output

# What a bypassed block returns, written per architecture from its source (independent of the analysis).
BYPASS = {
    "reference_dit": lambda a: a["x"],
    "dit": lambda a: a["hidden_states"],
    "pixart": lambda a: a["hidden_states"],
    "hunyuan_dit": lambda a: a["hidden_states"],
    "sana": lambda a: a["hidden_states"],
    "wan": lambda a: a["hidden_states"],
    "sd3": lambda a: (a["encoder_hidden_states"], a["hidden_states"]),
    "flux": lambda a: (a["encoder_hidden_states"], a["hidden_states"]),
    "qwen_image": lambda a: (a["encoder_hidden_states"], a["hidden_states"]),
    "cogvideox": lambda a: (a["hidden_states"], a["encoder_hidden_states"]),
}

# FFN out-projections the analysis must find in the first block of each kind (param name, column offset).
EXPECTED_OUT_PROJECTIONS = {
    "reference_dit": {("mlp.fc2.weight", 0)},
    "dit": {("ff.net.2.weight", 0)},
    "pixart": {("ff.net.2.weight", 0)},
    "hunyuan_dit": {("ff.net.2.weight", 0)},
    "wan": {("ffn.net.2.weight", 0)},
    "cogvideox": {("ff.net.2.weight", 0)},
    "sd3": {("ff.net.2.weight", 0), ("ff_context.net.2.weight", 0)},
    "flux": {("ff.net.2.weight", 0), ("ff_context.net.2.weight", 0), ("proj_out.weight", 16)},
    "qwen_image": {("img_mlp.net.2.weight", 0), ("txt_mlp.net.2.weight", 0)},
    "sana": {("ff.conv_point.weight", 0)},
}


def run(model, inputs):
    with torch.no_grad():
        return first_output(model(**inputs))


def test_untrained_elastic_model_reproduces_dense(transformed):
    dense = run(transformed.original, transformed.inputs)
    elastic = run(transformed.model, transformed.inputs)
    torch.testing.assert_close(elastic, dense, atol=1e-5, rtol=1e-5)
    decisions = ec.stats(transformed.model).decisions
    assert all(d.run and d.width == 1.0 for block in decisions for d in block)


def test_a_transformed_model_copies_silently_and_exactly(transformed):
    """Users A/B a transformed model against a deep copy of it: the copy warns nothing (block output structures
    are kept serialized: copying a torch ``TreeSpec`` warns per leaf) and computes the same at every forced plan."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin = copy.deepcopy(transformed.model)
    torch.testing.assert_close(run(twin, transformed.inputs), run(transformed.model, transformed.inputs))
    with ec.force(twin, skip=False, width=0.5), ec.force(transformed.model, skip=False, width=0.5):
        torch.testing.assert_close(run(twin, transformed.inputs), run(transformed.model, transformed.inputs))


def test_analysis_finds_the_ffns(transformed):
    specs = state_of(transformed.model).specs
    found = {(s.out_projection.param, s.out_projection.unit_starts[0]) for spec in specs for s in spec.sites}
    assert EXPECTED_OUT_PROJECTIONS[transformed.name] <= found


def _reference_with_units_dropped(t, width):
    """The original (unpermuted) model with each FFN's dropped units zeroed in its out-projection columns."""
    reference = copy.deepcopy(t.original)
    state = state_of(t.model)
    with torch.no_grad():
        for spec in state.specs:
            block = reference.get_submodule(spec.path)
            for site in spec.sites:
                order = state.permutations[(spec.index, site.name)]
                dropped = order[site.units_at(width):]
                weight = block.get_parameter(site.out_projection.param)
                weight.index_fill_(1, dropped + site.out_projection.unit_starts[0], 0.0)
    return reference


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75])
def test_forced_width_equals_top_units_of_the_original_ffn(transformed, width):
    expected = run(_reference_with_units_dropped(transformed, width), transformed.inputs)
    with ec.force(transformed.model, skip=False, width=width):
        got = run(transformed.model, transformed.inputs)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, run(transformed.original, transformed.inputs), atol=1e-4)


def _bypassed(t, indices):
    reference = copy.deepcopy(t.original)
    for spec in state_of(t.model).specs:
        if spec.index in indices:
            block = reference.get_submodule(spec.path)
            signature = inspect.signature(block.forward)

            def hook(module, args, kwargs, output, signature=signature):
                return BYPASS[t.name](signature.bind(*args, **kwargs).arguments)
            block.register_forward_hook(hook, with_kwargs=True)
    return reference


def test_forced_skip_equals_original_with_block_bypassed(transformed):
    specs = state_of(transformed.model).specs
    skippable = [s.index for s in specs if s.skippable]
    for index in (skippable[0], skippable[-1]):
        expected = run(_bypassed(transformed, {index}), transformed.inputs)
        with ec.force(transformed.model, skip={index}, width=1.0):
            got = run(transformed.model, transformed.inputs)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert [d.run for d in ec.stats(transformed.model).decisions[index]] == [False, False]


def _flops(model, inputs):
    with flop_counter() as counter, torch.no_grad():
        model(**inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("plan", [dict(width=0.25, skip=False), dict(width=1.0, skip="every other"),
                                  dict(width=0.5, skip="every other"), dict(width=1.0, skip=True)])
def test_executed_flops_fraction_matches_flop_counter(transformed, plan):
    specs = state_of(transformed.model).specs
    skip = plan["skip"]
    if skip == "every other":
        skip = {s.index for s in specs if s.index % 2 == 1 and s.skippable}
    dense = _flops(transformed.original, transformed.inputs)
    with ec.force(transformed.model, skip=skip, width=plan["width"]):
        measured = _flops(transformed.model, transformed.inputs) / dense
        stats = ec.stats(transformed.model)
    assert abs(stats.executed_flops_fraction - measured) <= 0.02 * measured
    assert stats.per_sample_flops_fraction == pytest.approx([measured] * 2, rel=0.02)
    if plan["width"] < 1.0 or skip:
        assert measured < 0.95


def test_unskippable_block_cannot_be_forced_to_skip():
    from conftest import Transformed
    t = Transformed("hunyuan_dit")
    specs = state_of(t.model).specs
    assert [s.skippable for s in specs] == [True, True, True, False]
    assert any("residual" in note for note in specs[3].notes)
    with pytest.raises(ec.errors.ConfigError, match="cannot be skipped"):
        with ec.force(t.model, skip={3}):
            pass
    with ec.force(t.model, skip=True):  # "skip everything" leaves the unskippable block running
        run(t.model, t.inputs)
    assert [d.run for d in ec.stats(t.model).decisions[3]] == [True, True]

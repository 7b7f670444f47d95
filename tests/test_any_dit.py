"""Issue 24: transform never aborts on a model whose forward runs; DiTs written the way public codebases outside
diffusers write them (tests/styles.py, tests/styles_text.py) become elastic and stay exact."""
import copy

import pytest
import torch
from torch import nn

import elastic_compile as ec
from elastic_compile.analysis import blocks as block_analysis
from elastic_compile.analysis.flop_counter import flop_counter
from elastic_compile.nn.gate import host
from elastic_compile.state import state_of
from helpers import randomize_routers, sample_inputs
from styles import DiT, DiTBlock
from styles_text import STYLES

# Per style: the block paths that must be found, and which of them can be skipped.
EXPECTED_BLOCKS = {
    "dit": (["blocks.0", "blocks.1", "blocks.2"], {0, 1, 2}),
    "uvit": (["in_blocks.0", "in_blocks.1", "mid_block", "out_blocks.0", "out_blocks.1"], {0, 1, 2}),
    "lightning": (["blocks.0", "blocks.1", "blocks.2"], {0, 1, 2}),
    "mmdit": (["joint_blocks.0", "joint_blocks.1", "joint_blocks.2"], {0, 1, 2}),
    "pixart_alpha": (["blocks.0", "blocks.1"], {0, 1}),
    "stdit": (["blocks.0", "blocks.1"], {0, 1}),
}
NOT_BATCH_MAJOR = {"pixart_alpha", "stdit"}  # captions flattened across the batch

_cache = {}


def transformed(name):
    if name not in _cache:
        torch.manual_seed(0)
        model, inputs = STYLES[name]()
        original = copy.deepcopy(model)
        ec.transform(model, example_inputs=inputs)
        _cache[name] = model, original, inputs
    return _cache[name]


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_is_found_and_exact_at_full_and_narrow_width(name):
    model, original, inputs = transformed(name)
    state = state_of(model)
    paths, skippable = EXPECTED_BLOCKS[name]
    assert [s.path for s in state.specs] == paths
    assert {s.index for s in state.specs if s.skippable} == skippable
    assert all(s.sites for s in state.specs), ec.report(model)
    assert all(s.rows_split is (name not in NOT_BATCH_MAJOR) for s in state.specs)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), original(**inputs), atol=1e-5, rtol=1e-5)
    # Width 1/4 equals the original with every dropped unit's out-projection column zeroed.
    reference = copy.deepcopy(original)
    with torch.no_grad():
        for spec in state.specs:
            for site in spec.sites:
                dropped = state.permutations[(spec.index, site.name)][site.units_at(0.25):]
                weight = reference.get_submodule(spec.path).get_parameter(site.out_projection.param)
                weight.index_fill_(1, dropped + site.out_projection.unit_starts[0], 0.0)
        with ec.force(model, skip=False, width=0.25):
            torch.testing.assert_close(model(**inputs), reference(**inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(STYLES))
def test_style_flop_fractions_are_measured(name):
    """Skip-all and width-1/4 fractions of dense FLOPs; forwards that read tensor values (.tolist() of caption
    lengths) are counted on their real inputs, and dense FLOPs match a FlopCounterMode over the original."""
    model, original, inputs = transformed(name)
    with torch.no_grad(), flop_counter() as counter:
        original(**inputs)
    fractions = {}
    for plan in (dict(skip=True), dict(skip=False, width=0.25)):
        with torch.no_grad(), ec.force(model, **plan):
            model(**inputs)
        stats = ec.stats(model)
        assert stats.dense_flops == counter.get_total_flops()
        fractions[str(plan)] = stats.executed_flops_fraction
    assert 0 < fractions[str(dict(skip=True))] < fractions[str(dict(skip=False, width=0.25))] < 1
    if name == "uvit":  # out-blocks (long skips) narrow but never skip; the mid block skips
        assert fractions[str(dict(skip=True))] < 0.6


class Bypass(nn.Module):
    def forward(self, x, *args, **kwargs):
        return x


def test_view_after_attention_transpose_keeps_blocks_skippable():
    """Class 3: the skip path keeps strides, so ``transpose(1, 2).view`` does not break the residual analysis;
    skipping every block equals the original with its blocks bypassed."""
    model, original, inputs = transformed("dit")
    bypassed = copy.deepcopy(original)
    bypassed.blocks = nn.ModuleList([Bypass() for _ in bypassed.blocks])
    with torch.no_grad(), ec.force(model, skip=True):
        torch.testing.assert_close(model(**inputs), bypassed(**inputs), atol=1e-6, rtol=1e-6)


class NumpyBlock(DiTBlock):
    """A block whose forward leaves torch for numpy: no exporter captures it."""

    def forward(self, x, c):
        scale = float(c.detach().abs().mean().numpy())
        return super().forward(x, c) * (1.0 + 0.0 * scale)


def test_a_block_no_exporter_captures_is_left_dense_and_the_rest_stays_elastic():
    """Class 5 and the rule: a block whose capture fails (export, then draft export) is left dense with the reason
    in the report; the others stay elastic; the result is still the dense model's."""
    torch.manual_seed(0)
    model = DiT(depth=3).eval()
    model.blocks.append(NumpyBlock(32, 2))
    inputs = dict(x=torch.randn(2, 4, 8, 8), t=torch.rand(2) * 1000, y=torch.randint(0, 10, (2,)))
    original = copy.deepcopy(model)
    ec.transform(model, example_inputs=inputs)
    report = ec.report(model)
    assert [b.path for b in report.blocks] == ["blocks.0", "blocks.1", "blocks.2"]
    assert "blocks.3" in report.left_dense and "capture failed" in report.left_dense["blocks.3"]
    assert "blocks.3" in str(report)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), original(**inputs), atol=1e-5, rtol=1e-5)
        with ec.force(model, skip=True):
            model(**inputs)
    assert 0 < ec.stats(model).executed_flops_fraction < 1  # real-tensor FLOP counting (.numpy() on fake fails)


class HostCountingMlp(nn.Module):
    """An MLP that, like HiDream's MoE inference path, counts on the host (``.cpu().numpy()``): no exporter
    traces it."""

    def __init__(self, dim):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x):
        rows = int((x[..., 0] > -1e9).sum().cpu().numpy())  # always every row
        return self.fc2(torch.nn.functional.gelu(self.fc1(x.reshape(rows, -1)))).reshape(x.shape)


class HostCountingBlock(DiTBlock):
    def __init__(self, dim, heads):
        super().__init__(dim, heads)
        self.mlp = HostCountingMlp(dim)


def test_a_block_with_an_untraceable_part_is_captured_with_it_opaque_and_stays_skippable():
    """Capture's last fallback: the part no exporter traces becomes an opaque call, so the block is still found,
    skip-only (that part stays dense), with the reason in the report; untrained = dense, skipping = bypassing."""
    torch.manual_seed(0)
    model = DiT(depth=2, block=HostCountingBlock).eval()
    inputs = dict(x=torch.randn(2, 4, 8, 8), t=torch.rand(2) * 1000, y=torch.randint(0, 10, (2,)))
    original = copy.deepcopy(model)
    ec.transform(model, example_inputs=inputs)
    specs = state_of(model).specs
    assert [s.path for s in specs] == ["blocks.0", "blocks.1"]
    assert all(s.skippable and not s.sites for s in specs)
    assert all(any("mlp as opaque calls" in n for n in s.notes) for s in specs), ec.report(model)
    bypassed = copy.deepcopy(original)
    bypassed.blocks = nn.ModuleList([Bypass() for _ in bypassed.blocks])
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), original(**inputs), atol=1e-5, rtol=1e-5)
        with ec.force(model, skip=True):
            torch.testing.assert_close(model(**inputs), bypassed(**inputs), atol=1e-6, rtol=1e-6)


def test_analysis_failures_degrade_one_capability(monkeypatch):
    """A stage raising a raw exception costs only its capability: no FFN analysis -> skip-only routers; no
    residual analysis -> width-only (blocks with an FFN) routers. Nothing escapes transform."""
    def broken(*args, **kwargs):
        raise RuntimeError("simulated analysis bug")
    torch.manual_seed(0)
    model, inputs = STYLES["dit"]()
    monkeypatch.setattr(block_analysis, "find_ffn_sites", broken)
    ec.transform(model, example_inputs=inputs)
    specs = state_of(model).specs
    assert len(specs) == 3 and all(s.skippable and not s.sites for s in specs)
    assert all(any("simulated analysis bug" in n for n in s.notes) for s in specs)
    monkeypatch.undo()
    torch.manual_seed(0)
    model, inputs = STYLES["dit"]()
    original = copy.deepcopy(model)
    monkeypatch.setattr(block_analysis, "find_residual_pairs", broken)
    ec.transform(model, example_inputs=inputs)
    specs = state_of(model).specs
    assert len(specs) == 3 and all(not s.skippable and s.sites for s in specs)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), original(**inputs), atol=1e-5, rtol=1e-5)


def _replay(model, calls, sample):
    """Pin each gate to the decisions ``calls`` recorded for ``sample`` (a batch-1 run of that sample alone)."""
    gates = {}
    for call in calls:
        gate = state_of(model).blocks[call.block].forward
        decision = ([call.run[sample]], [call.bucket[sample]], False, None, None)
        gate.routes_everything = lambda: False
        gate.decide = lambda arguments, batch, d=decision: d
        gates[call.block] = gate
    return gates


@pytest.mark.parametrize("name", sorted(NOT_BATCH_MAJOR))
def test_flattened_captions_with_disagreeing_routers_match_each_sample_alone(name, monkeypatch):
    """Class 6: routers that disagree across samples on a block whose captions are (1, sum(lens), C). Each
    sample's output equals its run alone under its recorded decisions (the blocks were found not to split by rows:
    see the style test's ``rows_split``)."""
    torch.manual_seed(0)
    model, inputs = STYLES[name](batch=3)
    ec.transform(model, example_inputs=inputs)
    unified = []
    real_plan = host.whole_batch_plan
    monkeypatch.setattr(host, "whole_batch_plan", lambda *a: unified.append(1) or real_plan(*a))
    state = state_of(model)
    for seed in range(40):  # find routers whose samples disagree somewhere
        randomize_routers(model, seed=seed)
        with torch.no_grad():
            out = model(**inputs)
        if unified:
            break
    assert unified, "no seed made the routers disagree"
    calls = list(state.calls)
    for sample in range(3):
        alone = sample_inputs(inputs, sample, 3)
        gates = _replay(model, calls, sample)
        try:
            with torch.no_grad():
                torch.testing.assert_close(model(**alone), out[sample:sample + 1], atol=1e-5, rtol=1e-5)
        finally:
            for gate in gates.values():
                del gate.routes_everything, gate.decide


def test_an_unexpected_failure_is_typed_never_raw(monkeypatch):
    """The last line of the rule: an exception no block-level fallback covers surfaces as TransformError (an
    ElasticCompileError naming the original), and the model's train/eval mode is restored."""
    import sys
    from elastic_compile.errors import ElasticCompileError
    transform_module = sys.modules["elastic_compile.transform"]  # the package exports a function of that name

    def broken(*args, **kwargs):
        raise IndexError("simulated pass bug")
    torch.manual_seed(0)
    model, inputs = STYLES["dit"]()
    model.train()
    monkeypatch.setattr(transform_module, "install", broken)
    with pytest.raises(ElasticCompileError, match="simulated pass bug") as info:
        ec.transform(model, example_inputs=inputs)
    assert isinstance(info.value, transform_module.TransformError) and model.training

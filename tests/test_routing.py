"""Per-sample decisions: batches split into plans, each sample as if run alone."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.nn.gate import best_bucket, run_probability
from elastic_compile.runtime.state import state_of
from helpers import randomize_routers, sample_inputs
from zoo import ARCHITECTURES, first_output


@pytest.mark.parametrize("name", ["reference_dit", "dit", "flux", "sd3", "qwen_image", "sana"])
def test_batch_equals_each_sample_alone_with_mixed_decisions(name):
    model, inputs = ARCHITECTURES[name](batch=4)
    ec.transform(model, example_inputs=inputs)
    with torch.no_grad():
        for seed in range(10):  # random routers that disagree between samples somewhere
            randomize_routers(model, seed=seed)
            batched = first_output(model(**inputs))
            decisions = ec.stats(model).decisions
            plans = [[(d.run, d.width) for d in block] for block in decisions]
            if any(len(set(p)) > 1 for p in plans):
                break
        assert any(len(set(p)) > 1 for p in plans)
        for i in range(4):
            alone = first_output(model(**sample_inputs(inputs, i, 4)))
            torch.testing.assert_close(batched[i:i + 1], alone, atol=1e-5, rtol=1e-5)
            assert [[(d.run, d.width) for d in block] for block in ec.stats(model).decisions] == \
                [[p[i]] for p in plans]


def test_per_sample_flops_follow_decisions():
    model, inputs = ARCHITECTURES["reference_dit"](batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    with torch.no_grad():
        model(**inputs)
    stats = ec.stats(model)
    assert stats.executed_flops_fraction == pytest.approx(sum(stats.per_sample_flops_fraction) / 4)
    work = [sum((d.width if d.run else 0.0) for d in (block[s] for block in stats.decisions)) for s in range(4)]
    by_work = sorted(range(4), key=lambda s: work[s])
    fractions = [stats.per_sample_flops_fraction[s] for s in by_work]
    assert fractions == sorted(fractions)
    assert len(set(round(f, 6) for f in fractions)) > 1


def test_untrained_router_runs_everything_at_full_width():
    model, inputs = ARCHITECTURES["flux"](batch=3)
    ec.transform(model, example_inputs=inputs)
    with torch.no_grad():
        model(**inputs)
    for router in ec.runtime.state.state_of(model).routers.values():
        run_logit, width_logits = router(_arguments_for(model, router, inputs))
        assert (torch.sigmoid(run_logit) > 0.95).all() and (width_logits.argmax(-1) == width_logits.shape[1] - 1).all()


def _arguments_for(model, router, inputs):
    """Router arguments with the right shapes, drawn at random (decisions must not depend on them at init)."""
    batch = 3
    out = {}
    for f in router.features:
        out[f.name] = torch.randn(batch, 5, f.dim) if f.kind == "pooled" else (
            torch.randn(batch, f.dim) if f.kind == "vector" else torch.rand(batch) * 1000)
    return out


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-50, 50, width=32), min_size=5, max_size=5))
def test_host_decisions_equal_the_tensor_ops_they_replace(row):
    """The gate decides from one host copy of the logits: sigmoid and argmax as torch computes them."""
    logits = torch.tensor(row)
    assert run_probability(row[0]) == pytest.approx(torch.sigmoid(logits[0]).item(), abs=1e-6)
    width = logits[1:]
    assert best_bucket(row[1:]) == int(width.argmax())


def test_non_finite_router_logits_run_the_block_at_full_width():
    assert run_probability(float("nan")) == 1.0
    assert run_probability(float("inf")) == 1.0 and run_probability(float("-inf")) == 0.0
    assert run_probability(-1e6) == 0.0 and run_probability(1e6) == 1.0  # no overflow
    assert best_bucket([0.0, float("nan"), 1.0]) == 2
    assert best_bucket([3.0, 3.0, 1.0]) == 0  # first maximum, as torch.argmax


def test_router_logits_tensor_matches_its_forward():
    model, inputs = ARCHITECTURES["dit"](batch=3)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=1)
    router = state_of(model).routers[0]
    arguments = _arguments_for(model, router, inputs)
    with torch.no_grad():
        run_logit, width_logits = router(arguments)
        torch.testing.assert_close(router.logits(arguments), torch.cat([run_logit[:, None], width_logits], 1))
        assert router.logits(arguments).shape == (3, 1 + len(state_of(model).config.width_buckets))

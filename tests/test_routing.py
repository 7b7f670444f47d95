"""Per-sample decisions: batches split into plans, each sample as if run alone."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.nn.gate.decisions import best_bucket, host_decisions, run_probability
from elastic_compile.state import state_of
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
    for router in state_of(model).routers.values():
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


SPECIAL = st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.floats(-50, 50, width=32) | SPECIAL, min_size=4, max_size=6), min_size=1, max_size=4)
       .filter(lambda rows: len({len(r) for r in rows}) == 1),
       st.floats(0.0, 1.0), st.booleans(), st.booleans())
def test_the_gates_one_pass_decisions_equal_the_per_row_functions(rows, threshold, decide_run, decide_bucket):
    """``host_decisions`` (what the gate runs between two graphs) is run_probability >= threshold and
    best_bucket row by row, non-finite logits included."""
    run, bucket, p_run = host_decisions(rows, threshold, decide_run, decide_bucket)
    if decide_run:
        assert p_run == [run_probability(row[0]) for row in rows]
        assert run == [run_probability(row[0]) >= threshold for row in rows]
    else:
        assert run is None and p_run is None
    assert bucket == ([best_bucket(row[1:]) for row in rows] if decide_bucket else None)


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


def _router_with_vector(seed=0):
    from elastic_compile.analysis.spec import RouterFeature
    from elastic_compile.nn.router import Router
    torch.manual_seed(seed)
    router = Router([RouterFeature("x", "pooled", 24), RouterFeature("c", "vector", 12),
                     RouterFeature("t", "scalar", 32)], 10, 4).eval()
    with torch.no_grad():
        for param in router.parameters():
            param.normal_()
    return router


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 5))
def test_inference_logits_equal_the_training_path(seed, batch):
    """Without gradients the router folds its LayerNorms into fc1: the same numbers, fewer operations."""
    router = _router_with_vector(seed)
    g = torch.Generator().manual_seed(seed)
    arguments = {"x": torch.randn(batch, 7, 24, generator=g) * 2 + 1, "c": torch.randn(batch, 12, generator=g),
                 "t": torch.rand(batch, generator=g) * 1000}
    expected = router.logits(arguments).detach()  # gradients enabled: the training path
    with torch.no_grad():
        torch.testing.assert_close(router.logits(arguments), expected, atol=1e-4, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), batch=st.integers(1, 4), unread=st.sets(st.sampled_from("xct")),
       one_timestep=st.booleans())
def test_features_with_zero_weights_are_not_computed_and_the_logits_stay_equal(seed, batch, unread, one_timestep):
    """A feature whose fc1 columns are all zero (a schedule router's per-sample features) is skipped by the
    inference path, which still returns one row per sample, equal to the training path."""
    router = _router_with_vector(seed)
    columns = {"x": slice(0, 24), "c": slice(24, 36), "t": slice(36, 68)}
    with torch.no_grad():
        for name in unread:
            router.fc1.weight[:, columns[name]] = 0.0
    g = torch.Generator().manual_seed(seed)
    arguments = {"x": torch.randn(batch, 7, 24, generator=g), "c": torch.randn(batch, 12, generator=g),
                 "t": torch.rand(1 if one_timestep else batch, generator=g) * 1000}
    expected = router.logits(arguments).detach()
    with torch.no_grad():
        got = router.logits(arguments)
        assert [f.name for f in router.folded()["unread"]] == [n for n in "xct" if n in unread]
    assert got.shape == (batch, expected.shape[1])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tokens", [1, 7, 256])
def test_token_sum_with_scaled_epsilon_equals_the_mean_where_epsilon_matters(tokens):
    """The inference path pools by sum with eps * n^2; where the pooled vector's variance is of the order of eps,
    a wrong scale would change the LayerNorm's output visibly."""
    router = _router_with_vector(seed=7)
    g = torch.Generator().manual_seed(tokens)
    x = 3e-3 * torch.randn(2, tokens, 24, generator=g)  # pooled variance ~1e-5 / tokens; eps = 1e-5
    arguments = {"x": x, "c": torch.randn(2, 12, generator=g), "t": torch.rand(2, generator=g) * 1000}
    expected = router.logits(arguments).detach()  # the training path: LayerNorm of the token mean
    with torch.no_grad():
        torch.testing.assert_close(router.logits(arguments), expected, atol=1e-4, rtol=1e-4)
        if tokens > 1:  # a sum with the unscaled eps is another function here, so the check above can fail
            unscaled = torch.nn.functional.layer_norm(x.sum(1), (24,), eps=router.norms[0].eps)
            mean_based = router.normalized(router.features[0], x, router.norms[0].eps, torch.float32)
            assert not torch.allclose(unscaled, mean_based, atol=1e-2)


def test_folded_weights_follow_every_change_of_the_router():
    router = _router_with_vector()
    arguments = {"x": torch.randn(2, 7, 24), "c": torch.randn(2, 12), "t": torch.rand(2) * 1000}
    with torch.no_grad():
        router.logits(arguments)
        router.reset_to_full_capacity()  # in place
        torch.testing.assert_close(router.logits(arguments), router.fc2.bias.expand(2, -1))
        router.load_state_dict(_router_with_vector(seed=3).state_dict())
        expected = _router_with_vector(seed=3).logits(arguments)
        torch.testing.assert_close(router.logits(arguments), expected)
        router.double()  # new storage, same version counters
        got = router.logits({k: v.double() for k, v in arguments.items()})
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected.double(), atol=1e-5, rtol=1e-5)
        # storage swapped through .data (moves no version counter: how diffusers' group offloading onloads)
        other = _router_with_vector(seed=4).double()
        for mine, theirs in zip(router.parameters(), other.parameters()):
            mine.data = theirs.detach().clone()
        doubled = {k: v.double() for k, v in arguments.items()}
        torch.testing.assert_close(router.logits(doubled), other.plain_logits(doubled), atol=1e-5, rtol=1e-5)


def test_a_conditioning_vector_is_normalised_once_for_all_routers():
    from elastic_compile.nn.router import SHARED_VECTORS
    routers = [_router_with_vector(seed) for seed in range(3)]
    arguments = {"x": torch.randn(2, 7, 24), "c": torch.randn(2, 12), "t": torch.rand(2) * 1000}
    SHARED_VECTORS.reset()
    with torch.no_grad():
        for router in routers:
            torch.testing.assert_close(router.logits(arguments), router.fc2(torch.nn.functional.silu(
                router.fc1(router.featurize(arguments)))), atol=1e-4, rtol=1e-4)
        assert (SHARED_VECTORS.misses, SHARED_VECTORS.hits) == (2, 4)  # the vector c and the scalar t, once each
        for name in ("c", "t"):
            arguments[name].mul_(3.0)  # changed in place: recomputed, never the stale value
            expected = routers[0].fc2(torch.nn.functional.silu(routers[0].fc1(routers[0].featurize(arguments))))
            torch.testing.assert_close(routers[0].logits(arguments), expected, atol=1e-4, rtol=1e-4)
        assert SHARED_VECTORS.misses == 4


def test_scalar_features_at_other_frequency_counts_are_not_shared():
    from elastic_compile.analysis.spec import RouterFeature
    from elastic_compile.nn.router import SHARED_VECTORS, Router
    torch.manual_seed(0)
    routers = [Router([RouterFeature("x", "pooled", 8), RouterFeature("t", "scalar", dim)], 6, 3).eval()
               for dim in (32, 16, 32)]
    for router in routers:
        with torch.no_grad():
            for param in router.parameters():
                param.normal_()
    arguments = {"x": torch.randn(3, 5, 8), "t": torch.rand(3) * 1000}
    SHARED_VECTORS.reset()
    for router in routers:
        expected = router.logits(arguments).detach()  # the training path
        with torch.no_grad():
            torch.testing.assert_close(router.logits(arguments), expected, atol=1e-4, rtol=1e-4)
    assert (SHARED_VECTORS.misses, SHARED_VECTORS.hits) == (2, 1)


@pytest.mark.parametrize("name", ["reference_dit", "flux"])
@pytest.mark.parametrize("setting", ["routed", "skip forced", "width forced", "cache", "cache band"])
def test_the_gates_inference_path_equals_its_general_path(name, setting, monkeypatch):
    """Inference with host routing takes a lean path through the gate when the router decides everything; it
    must decide, record, cache and output exactly what the general path (decisions through ``force`` and the
    block's spec first, as device routing and profiling take them) does."""
    from elastic_compile.nn.gate import BlockGate
    from elastic_compile.cache import FeatureCacheConfig, apply_feature_cache, cache_context, reset_cache

    def forwards(model, inputs, general: bool):
        if general:
            monkeypatch.setattr(BlockGate, "routes_everything", lambda self: False)
        else:
            monkeypatch.undo()
        reset_cache(model)
        outputs, decisions = [], []
        with torch.no_grad(), cache_context(model, "cond"):
            for step in range(4):  # other inputs each step: decisions change, cached deltas get reused and age
                g = torch.Generator().manual_seed(step)
                stepped = {k: v + torch.randn(v.shape, generator=g) if torch.is_tensor(v) and v.is_floating_point()
                           else v for k, v in inputs.items()}
                plan = {"skip forced": dict(skip={1}), "width forced": dict(width=0.5)}.get(setting)
                if plan is None:
                    outputs.append(first_output(model(**stepped)))
                else:
                    with ec.force(model, **plan):
                        outputs.append(first_output(model(**stepped)))
                decisions.append([[(d.run, d.width, d.reused) for d in block] for block in ec.stats(model).decisions])
        return outputs, decisions

    model, inputs = ARCHITECTURES[name](batch=3)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=5, scale=0.5 if setting == "cache band" else 3.0)  # band: p near the threshold
    if setting.startswith("cache"):
        apply_feature_cache(model, FeatureCacheConfig(max_reuse=1, band=0.45 if setting == "cache band" else None))
    general_outputs, general_decisions = forwards(model, inputs, general=True)
    lean_outputs, lean_decisions = forwards(model, inputs, general=False)
    assert lean_decisions == general_decisions
    assert len({str(d) for step in general_decisions for block in step for d in block}) > 1  # decisions vary
    if setting.startswith("cache"):
        assert any(d[2] for step in general_decisions for block in step for d in block)  # a cached delta was used
    for lean, general in zip(lean_outputs, general_outputs):
        torch.testing.assert_close(lean, general, atol=0, rtol=0)

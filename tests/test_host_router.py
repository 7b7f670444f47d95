"""HostRouter (NumPy) computes Router.logits; PooledSummaries serves only what it was given for that tensor."""
import gc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic_compile.analysis.spec import RouterFeature
from elastic_compile.export.program import SUMMARY_EPS, pooled_outputs, token_summary
from elastic_compile.nn.router import Router
from elastic_compile.serve.host_router import SINGLE_THREAD_GEMM, HostRouter, _matmul
from elastic_compile.serve.summaries import PooledSummaries


def _router(features, hidden, widths, seed):
    torch.manual_seed(seed)
    router = Router(features, hidden, widths).eval()
    with torch.no_grad():
        for param in router.parameters():
            param.normal_()
    return router


def _value(feature, batch, tokens, generator):
    if feature.kind == "scalar":
        return torch.rand(batch, generator=generator) * 1000
    if feature.kind == "pooled":
        shape = (batch,) + tuple(tokens) + (feature.dim,)
        return torch.randn(shape, generator=generator) * 3 + 2  # offset: LayerNorm centring matters
    return torch.randn(batch, feature.dim, generator=generator)


features_strategy = st.lists(
    st.tuples(st.sampled_from(["pooled", "vector", "scalar"]), st.integers(2, 40)), min_size=1, max_size=3)


@settings(max_examples=40, deadline=None)
@given(specs=features_strategy, hidden=st.integers(1, 24), widths=st.integers(1, 4), batch=st.integers(1, 6),
       tokens=st.lists(st.integers(1, 6), min_size=1, max_size=2), seed=st.integers(0, 2**16),
       summarized=st.booleans(), unread=st.integers(0, 7))
def test_host_router_equals_the_pytorch_router(specs, hidden, widths, batch, tokens, seed, summarized, unread):
    """Also where some features' fc1 weights are all zero (bit i of ``unread``: feature i), which both skip."""
    scalar_dim = next((2 * (d // 2 + 1) for k, d in specs if k == "scalar"), None)
    features = [RouterFeature(f"f{i}", kind, scalar_dim if kind == "scalar" else dim)
                for i, (kind, dim) in enumerate(specs)]
    router = _router(features, hidden, widths, seed)
    start = 0
    with torch.no_grad():
        for i, f in enumerate(features):
            if unread >> i & 1:
                router.fc1.weight[:, start:start + f.dim] = 0.0
            start += f.dim
    generator = torch.Generator().manual_seed(seed)
    arguments = {f.name: _value(f, batch, tokens, generator) for f in features}
    summaries = PooledSummaries()
    if summarized:
        for f in features:
            if f.kind == "pooled":
                summaries.remember(arguments[f.name], token_summary(arguments[f.name]), SUMMARY_EPS)
    with torch.no_grad():
        expected = router.logits(arguments)
    got = HostRouter(router, summaries).logits(arguments)
    assert got.shape == (batch, 1 + widths) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=2e-4 * max(1.0, float(expected.abs().max())), rtol=0)
    if summarized and any(f.kind == "pooled" and not unread >> i & 1 for i, f in enumerate(features)):
        assert summaries.hits >= 1


def _dit_router(seed=0):
    return _router([RouterFeature("x", "pooled", 32), RouterFeature("c", "vector", 16)], 8, 4, seed)


def _dit_arguments(batch=3, dtype=torch.float32):
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(batch, 10, 32, generator=generator).to(dtype),
            "c": torch.randn(batch, 16, generator=generator).to(dtype)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_streams_give_the_pytorch_routers_logits(dtype):
    router, arguments = _dit_router(), _dit_arguments(dtype=dtype)
    with torch.no_grad():
        expected = router.logits(arguments)
    torch.testing.assert_close(HostRouter(router).logits(arguments), expected, atol=1e-4, rtol=1e-4)


def test_weight_changes_on_the_pytorch_router_are_what_runs():
    router, arguments = _dit_router(), _dit_arguments()
    host = HostRouter(router)
    before = host.logits(arguments)
    router.reset_to_full_capacity()
    with torch.no_grad():
        torch.testing.assert_close(host.logits(arguments), router.logits(arguments), atol=1e-5, rtol=0)
    assert not torch.allclose(before, host.logits(arguments))
    router.load_state_dict(_dit_router(seed=5).state_dict())
    with torch.no_grad():
        torch.testing.assert_close(host.logits(arguments), router.logits(arguments), atol=1e-4, rtol=1e-4)
        router.norms[0].weight.mul_(2.0)  # an in-place edit of one LayerNorm is seen too
        torch.testing.assert_close(host.logits(arguments), router.logits(arguments), atol=1e-4, rtol=1e-4)


def test_non_finite_streams_give_non_finite_logits_like_pytorch():
    router, arguments = _dit_router(), _dit_arguments()
    arguments["x"][1, 3, 0] = float("nan")
    with torch.no_grad():
        expected = router.logits(arguments)
    got = HostRouter(router).logits(arguments)
    assert torch.isnan(got[1]).all() and torch.isnan(expected[1]).all()
    torch.testing.assert_close(got[[0, 2]], expected[[0, 2]], atol=1e-4, rtol=1e-4)


def test_vector_features_are_normalised_once_and_shared_between_routers():
    summaries = PooledSummaries()
    routers = [HostRouter(_dit_router(seed), summaries) for seed in range(3)]
    arguments = _dit_arguments()
    for host in routers:
        with torch.no_grad():
            expected = host.router.logits(arguments)
        torch.testing.assert_close(host.logits(arguments), expected, atol=1e-4, rtol=1e-4)
    # first router: two misses (stream and vector); the next two find both
    assert (summaries.misses, summaries.hits) == (2, 4)


def test_scalar_features_are_normalised_once_per_frequency_count():
    from elastic_compile.analysis.spec import RouterFeature
    summaries = PooledSummaries()
    routers = [HostRouter(_router([RouterFeature("x", "pooled", 8), RouterFeature("t", "scalar", dim)], 6, 3, seed),
                          summaries) for seed, dim in enumerate((32, 16, 32))]
    arguments = {"x": torch.randn(3, 5, 8), "t": torch.rand(3) * 1000}
    for host in routers:
        with torch.no_grad():
            expected = host.router.logits(arguments)
        torch.testing.assert_close(host.logits(arguments), expected, atol=1e-4, rtol=1e-4)
    assert (summaries.misses, summaries.hits) == (3, 3)  # x once, t once at 32 frequencies and once at 16
    arguments["t"].add_(1.0)  # changed in place: recomputed
    with torch.no_grad():
        expected = routers[2].router.logits(arguments)
    torch.testing.assert_close(routers[2].logits(arguments), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 4, 5, 6, 64])
def test_large_batches_multiply_in_single_threaded_chunks(rows):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, 768), dtype=np.float32)
    w = rng.standard_normal((768, 64), dtype=np.float32)
    assert SINGLE_THREAD_GEMM // (768 * 64) == 5  # 6 and 64 rows take the chunked path
    np.testing.assert_allclose(_matmul(x, w), x.astype(np.float64) @ w.astype(np.float64), rtol=1e-4, atol=1e-3)


# summaries ---------------------------------------------------------------------------------------------------
def test_a_summary_is_served_only_for_the_same_unmodified_tensor_and_epsilon():
    summaries = PooledSummaries()
    stream = torch.randn(2, 5, 8)
    summary = token_summary(stream)
    summaries.remember(stream, summary, SUMMARY_EPS)
    np.testing.assert_array_equal(summaries.lookup(stream, SUMMARY_EPS), summary.numpy())
    assert summaries.lookup(stream.clone(), SUMMARY_EPS) is None  # equal values, another tensor
    assert summaries.lookup(stream, 1e-6) is None
    assert summaries.lookup(stream, SUMMARY_EPS, kind="vector") is None
    stream.add_(1.0)  # modified in place after the graph summarised it
    assert summaries.lookup(stream, SUMMARY_EPS) is None


def test_a_summary_is_converted_once_on_its_first_lookup():
    """The executor hands over graph outputs as they are; a lookup serves float32 NumPy and keeps that form."""
    summaries = PooledSummaries()
    stream = torch.randn(2, 5, 8)
    summary = token_summary(stream).double()
    summaries.remember(stream, summary, SUMMARY_EPS)
    first = summaries.lookup(stream, SUMMARY_EPS)
    assert isinstance(first, np.ndarray) and first.dtype == np.float32
    np.testing.assert_array_equal(first, summary.float().numpy())
    assert summaries.lookup(stream, SUMMARY_EPS) is first  # converted once
    assert (summaries.hits, summaries.misses) == (2, 0)
    stream.mul_(2.0)  # the conversion kept the stamp: an in-place change is still a miss
    assert summaries.lookup(stream, SUMMARY_EPS) is None


def test_summaries_hold_no_stream_alive_and_keep_only_the_latest():
    summaries = PooledSummaries(capacity=2)
    streams = [torch.randn(1, 3, 4) for _ in range(3)]
    for s in streams:
        summaries.remember(s, token_summary(s), SUMMARY_EPS)
    assert summaries.lookup(streams[0], SUMMARY_EPS) is None
    assert summaries.lookup(streams[2], SUMMARY_EPS) is not None
    del streams[2]
    gc.collect()
    reused = torch.randn(1, 3, 4)  # may get the dead tensor's id: must not inherit its summary
    assert summaries.lookup(reused, SUMMARY_EPS) is None


def test_a_summary_of_the_wrong_shape_is_never_stored():
    summaries = PooledSummaries()
    stream = torch.randn(2, 5, 8)
    summaries.remember(stream, torch.zeros(2, 7), SUMMARY_EPS)
    summaries.remember(stream, torch.zeros(3, 8), SUMMARY_EPS)
    assert summaries.lookup(stream, SUMMARY_EPS) is None


def test_token_summary_is_the_layer_normalised_token_mean():
    stream = torch.randn(3, 4, 5, 16, dtype=torch.float64)
    mean = stream.mean(dim=(1, 2))
    expected = (mean - mean.mean(-1, keepdim=True)) / torch.sqrt(mean.var(-1, unbiased=False, keepdim=True) + SUMMARY_EPS)
    torch.testing.assert_close(token_summary(stream.float()).double(), expected, atol=1e-5, rtol=0)
    outputs = [stream.float(), torch.randn(3, 16), torch.randn(2, 4, 16), torch.zeros(3, 4, 16, dtype=torch.long)]
    assert pooled_outputs(outputs, batch=3) == [0]

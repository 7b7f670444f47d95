"""Device-side routing: decisions as tensors and buckets behind device conditions give the host gate's outputs."""
import contextlib
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.errors import BackendUnavailableError, ConfigError
from elastic_compile.nn.gate.decisions import best_bucket, run_probability
from elastic_compile.serve.cuda_graph import capture_cuda_graph
from elastic_compile.nn.gate.decisions import device_decisions, run_logit_threshold
from elastic_compile.nn.gate.device import Branches, device_routing
from elastic_compile.state import state_of
from helpers import mixed_routers, plans, randomize_routers, stand_in_capture
from zoo import ARCHITECTURES, first_output


def host_then_device(model, inputs, **routing):
    """(output, plans) of one forward on the host gate, then of the same forward routed on the device."""
    with torch.no_grad():
        expected = first_output(model(**inputs))
        expected_plans = plans(model)
        with device_routing(model, "host", **routing):
            routed = first_output(model(**inputs))
    return (expected, expected_plans), (routed, plans(model))


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_device_routing_matches_host_gate_on_every_architecture(name):
    model, inputs = ARCHITECTURES[name](batch=4)
    ec.transform(model, example_inputs=inputs)
    expected_plans = mixed_routers(model, inputs)
    with torch.no_grad():
        expected = first_output(model(**inputs))
        host_stats = ec.stats(model)
        assert host_stats.executed_flops_fraction == host_stats.decided_flops_fraction
        for mode in ("host", "every"):
            with device_routing(model, mode):
                routed = first_output(model(**inputs))
            torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
            assert plans(model) == expected_plans  # read after the with block: decisions copied when asked
            routed_stats = ec.stats(model)
            # one run per block at the widest running bucket: more than the decisions when samples disagree
            assert routed_stats.decided_flops_fraction == pytest.approx(host_stats.executed_flops_fraction)
            assert routed_stats.executed_flops_fraction > routed_stats.decided_flops_fraction


def test_batch_one_and_partial_force():
    model, inputs = ARCHITECTURES["dit"](batch=1)
    ec.transform(model, example_inputs=inputs)
    with torch.no_grad():
        for seed in range(6):
            randomize_routers(model, seed=seed)
            for plan in (dict(), dict(width=0.5), dict(skip=False), dict(skip={0})):
                with ec.force(model, **plan):
                    (expected, expected_plans), (routed, routed_plans) = host_then_device(model, inputs)
                torch.testing.assert_close(routed, expected, atol=1e-6, rtol=1e-6)
                assert routed_plans == expected_plans
                routed_stats = ec.stats(model)  # batch 1: the widest running bucket is the sample's own
                assert routed_stats.executed_flops_fraction == pytest.approx(routed_stats.decided_flops_fraction)


@pytest.mark.parametrize("plan", [dict(width=0.5), dict(skip=False), dict(skip={1})])
def test_partial_force_with_mixed_batches(plan):
    model, inputs = ARCHITECTURES["flux"](batch=4)
    ec.transform(model, example_inputs=inputs)
    mixed_routers(model, inputs)
    with ec.force(model, **plan):
        (expected, expected_plans), (routed, routed_plans) = host_then_device(model, inputs)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    assert routed_plans == expected_plans


def test_non_finite_inputs_run_the_dense_block_like_the_host_gate():
    model, inputs = ARCHITECTURES["dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    bad = dict(inputs, hidden_states=inputs["hidden_states"].clone())
    bad["hidden_states"][1] = float("nan")
    (expected, expected_plans), (routed, routed_plans) = host_then_device(model, bad)
    assert routed_plans == expected_plans
    assert all(block[1] == (True, 1.0) for block in expected_plans)  # a NaN logit runs at full width
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5, equal_nan=True)


def test_full_force_takes_the_host_path_and_logs_it():
    model, inputs = ARCHITECTURES["reference_dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=1)
    with torch.no_grad(), ec.force(model, skip={1}, width=0.25):
        expected = first_output(model(**inputs))
        with device_routing(model, "host") as routing:
            routed = first_output(model(**inputs))
    torch.testing.assert_close(routed, expected)
    assert all(isinstance(run, list) for _, run, *_ in routing.log)
    assert [d.run for d in ec.stats(model).decisions[1]] == [False, False]


def test_a_later_host_forward_replaces_device_decisions():
    model, inputs = ARCHITECTURES["reference_dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=2)
    with torch.no_grad():
        with device_routing(model, "host"):
            model(**inputs)
        with ec.force(model, skip=False, width=1.0):
            model(**inputs)
    assert ec.stats(model).executed_flops_fraction == pytest.approx(1.0)
    assert state_of(model).pending_calls is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.one_of(st.floats(-30, 30, width=32), st.just(math.nan)), min_size=4, max_size=4),
                min_size=1, max_size=6),
       st.sampled_from([0.2, 0.5, 0.7]), st.booleans(), st.booleans())
def test_device_decisions_equal_host_decisions(rows, threshold, can_skip, elastic_width):
    if any(abs(r[0] - run_logit_threshold(threshold)) < 1e-4 for r in rows):
        return  # float32 vs float64 rounding at the threshold itself
    logits = torch.tensor(rows, dtype=torch.float32)
    run, bucket = device_decisions(logits, can_skip, elastic_width, threshold, dense_bucket=2)
    for r, b, row in zip(run.tolist(), bucket.tolist(), rows):
        assert r == (run_probability(row[0]) >= threshold if can_skip else True)
        assert b == (best_bucket(row[1:]) if elastic_width else 2)


def test_bfloat16_logits_decide_like_their_float_values():
    logits = torch.tensor([[0.3, 1.0, 1.0, -2.0], [-0.7, -1.0, 3.0, 3.0]], dtype=torch.bfloat16)
    run, bucket = device_decisions(logits, True, True, 0.5, dense_bucket=2)
    assert run.tolist() == [True, False] and bucket.tolist() == [0, 1]  # ties: the first maximum, as argmax


def test_unsupported_setups_are_typed_errors():
    model, inputs = ARCHITECTURES["reference_dit"](batch=1)
    ec.transform(model, example_inputs=inputs)
    with pytest.raises(ConfigError):
        Branches("sometimes")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailableError):
            with device_routing(model, "graph"):
                pass
        with pytest.raises(BackendUnavailableError):
            capture_cuda_graph(model, inputs)


def test_captured_forward_copies_inputs_and_reports_the_replayed_decisions():
    from elastic_compile.errors import InputMismatchError
    model, inputs = ARCHITECTURES["reference_dit"](batch=2)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=4)
    captured = stand_in_capture(model, inputs)
    for seed in range(3):
        new = dict(inputs, x=torch.randn_like(inputs["x"]), t=torch.rand(2) * 1000)
        out = first_output(captured(**new))
        replayed = plans(model)
        with torch.no_grad():
            expected = first_output(model(**new))
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
        assert plans(model) == replayed
    positional = first_output(captured(new["x"], new["t"], new["y"]))  # bound to the forward's parameter names
    torch.testing.assert_close(positional, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(InputMismatchError, match="static shapes"):
        captured(**dict(inputs, x=inputs["x"][:1]))
    with pytest.raises(InputMismatchError, match="structured"):
        captured(x=inputs["x"])


def test_a_captured_forward_serves_the_sampling_loop():
    """The sampler calls ``denoiser(x, timestep=t, class_labels=y, return_dict=False)`` with the CFG batch: a
    graph captured from keyword inputs of that batch replays those calls, with the routed model's images."""
    from elastic_compile.reference import load_reference
    from elastic_compile.sampling import sample
    model, scheduler, config = load_reference()
    ec.transform(model, example_inputs=dict(hidden_states=torch.randn(2, 1, 8, 8), timestep=torch.tensor([1.0, 2.0]),
                                            class_labels=torch.tensor([1, 2]), return_dict=False))
    randomize_routers(model, seed=5, scale=1.0)
    labels = [1, 3]
    cfg_batch = dict(hidden_states=torch.zeros(4, 1, 8, 8), timestep=torch.zeros(4),
                     class_labels=torch.zeros(4, dtype=torch.long), return_dict=False)
    captured = stand_in_capture(model, cfg_batch, clone_outputs=False)
    expected = sample(model, scheduler, labels, config, seed=7, num_inference_steps=4)
    served = sample(captured, scheduler, labels, config, seed=7, num_inference_steps=4)
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert 0.0 < ec.stats(model).executed_flops_fraction < 1.0


@pytest.mark.parametrize("cache,actions", [(dict(max_reuse=2), ("reuse",)), (dict(max_reuse=1, band=0.3), ("reuse",)),
                                           (dict(max_reuse=2, fallback="run"), ("reuse",)),
                                           (dict(max_reuse=3, fallback="run"), ("reuse", "forecast", "forecast2"))])
@pytest.mark.parametrize("cfg", ["batch", "separate"])
def test_feature_cache_on_the_device_follows_the_host_rules(cache, actions, cfg):
    """A whole generation with the feature cache: device-side update histories, stand-in streaks, band,
    fallback and per-sample skip actions (reuse, first- and second-order forecasts) give the host gate's images
    and per-step decisions (run, width, stand-in), per CFG branch; ``reset_cache`` reaches them."""
    from elastic_compile.reference import load_reference
    from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache
    from elastic_compile.sampling import sample
    model, scheduler, config = load_reference()
    ec.transform(model, ec.ElasticConfig(skip_actions=actions),
                 example_inputs=dict(hidden_states=torch.randn(2, 1, 8, 8), timestep=torch.tensor([1.0, 2.0]),
                                     class_labels=torch.tensor([1, 2]), return_dict=False))
    randomize_routers(model, seed=11, scale=1.0)
    apply_feature_cache(model, FeatureCacheConfig(**cache))
    hooks = ElasticCacheHooks(model)
    runs = {}
    for routed in (False, True):
        steps = runs[routed] = []

        def record(step, latents):
            stats = ec.stats(model)
            steps.append([[(d.run, d.width, d.reused) for d in block] for block in stats.decisions])
        with contextlib.ExitStack() as stack:
            if routed:
                stack.enter_context(device_routing(model, "host"))
            images = sample(model, scheduler, [1, 4, 6], config, seed=3, num_inference_steps=6, cfg=cfg,
                            hooks=hooks, on_step_end=record)
        runs[routed, "images"] = images
    torch.testing.assert_close(runs[True, "images"], runs[False, "images"], atol=1e-5, rtol=0)
    assert runs[True] == runs[False]
    flat = [d for step in runs[False] for block in step for d in block]
    assert any(reused for _, _, reused in flat) and any(run for run, _, _ in flat)
    entries = state_of(model).cache.device_entries
    assert entries and not any(bool(e.count.any()) for e in entries.values())  # reset when the generation ended


def test_captured_forwards_serve_the_cache_per_context():
    """One graph per cache context; the sampler's hooks pick the graph; images and reuse as on the host."""
    from elastic_compile.reference import load_reference
    from elastic_compile.cache import ElasticCacheHooks, FeatureCacheConfig, apply_feature_cache, cache_context
    from elastic_compile.sampling import sample
    model, scheduler, config = load_reference()
    ec.transform(model, example_inputs=dict(hidden_states=torch.randn(2, 1, 8, 8), timestep=torch.tensor([1.0, 2.0]),
                                            class_labels=torch.tensor([1, 2]), return_dict=False))
    randomize_routers(model, seed=11, scale=1.0)
    apply_feature_cache(model, FeatureCacheConfig(max_reuse=2))
    hooks = ElasticCacheHooks(model)
    expected = sample(model, scheduler, [2, 5], config, seed=1, num_inference_steps=6, cfg="separate", hooks=hooks)
    reused = []
    batch = dict(hidden_states=torch.zeros(2, 1, 8, 8), timestep=torch.zeros(2),
                 class_labels=torch.zeros(2, dtype=torch.long), return_dict=False)
    captured = stand_in_capture(model, batch, clone_outputs=False, contexts=("cond", "uncond"))
    served = sample(captured, scheduler, [2, 5], config, seed=1, num_inference_steps=6, cfg="separate", hooks=hooks,
                    on_step_end=lambda step, x: reused.append(
                        any(d.reused for block in ec.stats(model).decisions for d in block)))
    torch.testing.assert_close(served, expected, atol=1e-5, rtol=0)
    assert any(reused)
    with pytest.raises(ConfigError, match="captured cache contexts"), cache_context(model, "cond_uncond"):
        captured(**batch)


def test_fused_decisions_decide_like_the_plain_ones():
    """``fuse_decisions``: the decision ops compiled (inductor; C++ on CPU, Triton on a GPU) give the same plans."""
    model, inputs = ARCHITECTURES["reference_dit"](batch=4)
    ec.transform(model, example_inputs=inputs)
    mixed = mixed_routers(model, inputs)
    (expected, expected_plans), (routed, routed_plans) = host_then_device(model, inputs, fuse_decisions=True)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    assert routed_plans == expected_plans == mixed

"""Compiled routing: ``torch.compile(fullgraph=True)`` of an elastic model under ``device_routing(model, "compile")``
gives the eager outputs and decisions, with no graph break."""
import pytest
import torch

import elastic_compile as ec
from elastic_compile.errors import ConfigError
from elastic_compile.nn.gate.device import device_routing
from helpers import mixed_routers, plans, randomize_routers
from zoo import ARCHITECTURES


def mixed_model(batch=4):
    """The reference DiT with routers under which some samples skip a block, some blocks run samples at
    different widths, and some block is skipped by every sample."""
    model, inputs = ARCHITECTURES["reference_dit"](batch=batch)
    ec.transform(model, example_inputs=inputs)
    return model, inputs, mixed_routers(model, inputs, fully_skipped_block=True)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_fullgraph_compile_equals_eager_routing():
    model, inputs, expected_plans = mixed_model()
    with torch.no_grad():
        expected = model(**inputs)  # host routing, eager: the reference
        with device_routing(model, "compile"):
            eager = model(**inputs)
            compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
            routed = compiled(**inputs)
            assert plans(model) == expected_plans  # decisions recorded as tensors by the compiled graph
            again = compiled(**{**inputs, "x": inputs["x"] * 0.5})
            reference_again = model(**{**inputs, "x": inputs["x"] * 0.5})
    torch.testing.assert_close(eager, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, reference_again, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(routed, again)


def test_no_graph_break():
    model, inputs, _ = mixed_model()
    with torch.no_grad(), device_routing(model, "compile"):
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0
    assert explained.graph_count == 1


def test_host_routing_breaks_the_graph():
    """What the compiled mode is for: the default (host) routing copies decisions to the host per block."""
    model, inputs, _ = mixed_model()
    with torch.no_grad():
        explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count > 0


def test_feature_cache_is_a_typed_error():
    model, inputs, _ = mixed_model(batch=2)
    ec.apply_feature_cache(model)
    with torch.no_grad(), device_routing(model, "compile"), pytest.raises(ConfigError, match="feature cache"):
        model(**inputs)


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_diffusers_block_compiles_fullgraph_with_select(name):
    """diffusers' Attention cannot be traced inside a torch.cond branch (torch 2.13): "compile_select" runs every
    block and selects rows, and still traces whole (DiT; PixArt, whose blocks also read the caption)."""
    model, inputs = ARCHITECTURES[name](batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    with torch.no_grad():
        expected = model(**inputs)[0]
        expected_plans = plans(model)
        with device_routing(model, "compile_select"):
            routed = torch.compile(model, fullgraph=True, backend="aot_eager")(**inputs)[0]
            assert plans(model) == expected_plans
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)


def test_diffusers_regional_compile_fullgraph():
    """diffusers' ``compile_repeated_blocks(fullgraph=True)`` (each repeated block compiled on its own) of a
    transformed Flux: the gates trace inside each block's graph, with torch.cond (Flux attention traces)."""
    model, inputs = ARCHITECTURES["flux"](batch=4)
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, seed=3)
    with torch.no_grad():
        expected = model(**inputs)[0]
        expected_plans = plans(model)
        assert any(not r for block in expected_plans for r, _ in block)
        torch._dynamo.utils.counters.clear()
        with device_routing(model, "compile"):
            model.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
            routed = model(**inputs)[0]
            assert plans(model) == expected_plans
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # both block classes compiled
    torch.testing.assert_close(routed, expected, atol=1e-5, rtol=1e-5)

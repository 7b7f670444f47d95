"""Router lookahead: a block graph (or a graph of the ops outside the blocks) also computes the next block's router
logits, and the ONNX Runtime runtime serves them to that router only for the very tensors they came from, while
the router holds exported weights."""
import json

import onnx
import pytest
import torch

import elastic_compile as ec
from elastic_compile.serve.lookahead import ExportedWeights, LookaheadLogits
from elastic_compile.state import gate_of, state_of
from zoo import ARCHITECTURES, first_output, glue_dit


def _routers_that_run_every_block(model, seed=0):
    """Non-trivial logits, every block runs (full-capacity run bias), widths vary by sample: uniform plans."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for router in state_of(model).routers.values():
            router.fc2.weight.copy_(torch.randn(router.fc2.weight.shape, generator=generator) * 0.01)


def _export(model, inputs, out, **options):
    ec.transform(model, example_inputs=inputs)
    _routers_that_run_every_block(model)
    return ec.export(model, inputs, out, batch_sizes=[4], threads=1, **options)


def _memo(runtime) -> LookaheadLogits:
    return next(gate_of(b).router.lookahead for b in state_of(runtime).blocks
                if getattr(gate_of(b).router, "lookahead", None) is not None)


def _outside_lookaheads(out) -> list[int]:
    """Blocks whose router logits a graph outside the blocks computes (program steps with a lookahead)."""
    program = json.loads((out / "manifest.json").read_text())["program"]
    return [int(step["lookahead"]["block"]) for step in program["steps"] if "lookahead" in step]


def _same_as_pytorch(model, runtime, inputs):
    with torch.no_grad():
        expected = first_output(model(**inputs))
    got = first_output(runtime(**inputs))
    assert float((got - expected).abs().max()) <= 1e-4
    assert ec.stats(runtime).decisions == ec.stats(model).decisions


@pytest.mark.parametrize("name", ["dit", "flux"])
def test_graphs_compute_the_next_router_and_the_runtime_serves_it(name, tmp_path):
    model, inputs = ARCHITECTURES[name](batch=4)
    out = _export(model, inputs, tmp_path / name)
    blocks = json.loads((out / "manifest.json").read_text())["blocks"]
    ahead = [entry for entry in blocks if "lookahead" in entry]
    assert [e["lookahead"]["block"] for e in ahead] == [e["index"] + 1 for e in ahead] and len(ahead) == len(blocks) - 1
    for entry in ahead:  # outputs: the block's, its token summaries, the next router's (B, 1 + K) logits
        graph = onnx.load(out / entry["graphs"]["0"]["4"], load_external_data=False).graph
        assert len(graph.output) == len(entry["outputs"]["leaves"]) - sum(
            leaf["kind"] != "tensor" for leaf in entry["outputs"]["leaves"]) + len(entry["pooled_outputs"]) + 1
    outside = _outside_lookaheads(out)
    assert outside[:1] == [0]  # the first graph computes what the first block's router reads
    served = len(ahead) + len(outside)
    runtime = ec.runtime.load(out, threads=1)
    memo = _memo(runtime)
    _same_as_pytorch(model, runtime, inputs)
    assert (memo.hits, memo.misses) == (served, 0)
    # a router whose weights changed after export computes its logits itself; put back, it is served again
    for target in (runtime, model):
        with torch.no_grad():
            state_of(target).routers[1].fc2.weight.mul_(-1.0)
    memo.reset()
    _same_as_pytorch(model, runtime, inputs)
    assert (memo.hits, memo.misses) == (served - 1, 0)
    for target in (runtime, model):
        with torch.no_grad():
            state_of(target).routers[1].fc2.weight.mul_(-1.0)
    memo.reset()
    _same_as_pytorch(model, runtime, inputs)
    assert memo.hits == served
    # the ops outside the blocks in PyTorch (driver off): no graph computed the first router's logits
    runtime.driver.enabled = False
    memo.reset()
    _same_as_pytorch(model, runtime, inputs)
    assert (memo.hits, memo.misses) == (len(ahead), len(outside))


def test_skips_mixed_plans_and_glue_code_are_misses(tmp_path):
    model, inputs = glue_dit(), dict(x=torch.randn(4, 4, 8, 8), t=torch.rand(4) * 1000, y=torch.tensor([1, 2, 3, 4]))
    out = _export(model, inputs, tmp_path / "glue", base_factory="zoo:glue_dit")
    blocks = json.loads((out / "manifest.json").read_text())["blocks"]
    assert [("lookahead" in e) for e in blocks] == [False, True, False]  # block 1 reads glue's output
    # the glue code's graph computes block 1's router (taking the conditioning vector as an extra input), the
    # first graph block 0's
    assert _outside_lookaheads(out) == [0, 1]
    runtime = ec.runtime.load(out, threads=1, base_factory="zoo:glue_dit")
    memo = _memo(runtime)
    _same_as_pytorch(model, runtime, inputs)
    assert (memo.hits, memo.misses) == (3, 0)
    with ec.force(runtime, skip={1}), ec.force(model, skip={1}):  # block 1 skipped: router 2 reads another tensor
        memo.reset()
        _same_as_pytorch(model, runtime, inputs)
        assert memo.hits == 2  # routers 0 and 1: their inputs come straight from graphs that ran
    from helpers import randomize_routers
    for target in (runtime, model):
        randomize_routers(target, seed=5)  # mixed per-sample plans, and weights unlike the exported ones
    memo.reset()
    _same_as_pytorch(model, runtime, inputs)
    assert memo.hits == 0


def test_no_lookahead_without_router_summaries(tmp_path):
    model, inputs = ARCHITECTURES["dit"](batch=4)
    out = _export(model, inputs, tmp_path / "plain", router_summaries=False, verify_runtime=False)
    assert not any("lookahead" in e for e in json.loads((out / "manifest.json").read_text())["blocks"])
    assert _outside_lookaheads(out) == []


def test_logits_are_served_only_for_the_same_unmodified_tensors():
    memo = LookaheadLogits()
    stream, vector, logits = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 4)
    memo.remember(3, [stream, vector], logits)
    assert memo.lookup(3, [stream, vector]) is logits
    assert memo.lookup(2, [stream, vector]) is None  # another router
    assert memo.lookup(3, [stream.clone(), vector]) is None  # equal values, another tensor
    assert memo.lookup(3, [stream]) is None and memo.lookup(3, [stream, None]) is None
    vector.add_(1.0)  # modified in place since
    assert memo.lookup(3, [stream, vector]) is None
    assert (memo.hits, memo.misses) == (1, 5)


def test_exported_weights_follow_changes_by_value():
    from elastic_compile.analysis.spec import RouterFeature
    from elastic_compile.nn.router import Router
    router = Router([RouterFeature("x", "pooled", 8)], 4, 3)
    exported = ExportedWeights(router)
    assert exported.current()
    router.reset_to_full_capacity()  # in place, same values: still the exported weights
    assert exported.current()
    with torch.no_grad():
        router.fc1.weight.mul_(-1.0)
    assert not exported.current()
    with torch.no_grad():
        router.fc1.weight.mul_(-1.0)  # exactly the exported values again
    assert exported.current()

"""The parts of a model outside its blocks as graphs: capture with opaque blocks, the cut into segments, the
exported program, and the runtime's driver that runs it in place of the model's Python forward."""
import json

import pytest
import torch
from torch.utils import _pytree as pytree
from hypothesis import HealthCheck, given, settings, strategies as st

import elastic_compile as ec
from elastic_compile.capture.opaque_blocks import capture_with_opaque_blocks
from elastic_compile.export.outside import resize_batch
from elastic_compile.export.recording import record_block_calls
from elastic_compile.export.segments import BlockCall, Segment, split_at_blocks
from elastic_compile.artifact.graphs import BlockCalls, plan_releases, run_steps
from elastic_compile.state import force, state_of
from helpers import randomize_routers
from zoo import ARCHITECTURES, first_output


class StagedDiT(torch.nn.Module):
    """The hand-written DiT with PyTorch code between chosen blocks: ``glue[i]`` runs after block ``i`` (0: none,
    1: scale the stream, 2: add a learned offset, 3: a residual of the stream before the block)."""

    def __init__(self, glue=(0, 1, 0)):
        super().__init__()
        from elastic_compile.models.dit import DiT
        self.glue = list(glue)
        self.dit = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=len(self.glue), num_heads=2,
                       num_classes=10)
        self.offset = torch.nn.Parameter(torch.randn(32) * 0.1)

    def forward(self, x, t, y):
        dit = self.dit
        tokens = dit.x_embedder(x).flatten(2).transpose(1, 2) + dit.pos_embed
        c = dit.t_embedder(t) + dit.y_embedder(y)
        for glue, block in zip(self.glue, dit.blocks):
            before = tokens
            tokens = block(tokens, c)
            if glue == 1:
                tokens = tokens * 0.5
            elif glue == 2:
                tokens = tokens + self.offset
            elif glue == 3:
                tokens = tokens + 0.25 * before
        shift, scale = dit.final_modulation(c).chunk(2, dim=1)
        tokens = dit.final_linear(dit.final_norm(tokens) * (1 + scale[:, None]) + shift[:, None])
        return dit._unpatchify(tokens)


def staged_dit():
    torch.manual_seed(0)
    return StagedDiT().eval()


def _inputs(batch=2):
    generator = torch.Generator().manual_seed(1)
    return dict(x=torch.randn(batch, 4, 8, 8, generator=generator), t=torch.rand(batch, generator=generator) * 1000,
                y=torch.randint(0, 10, (batch,), generator=generator))


def _program_in_torch(model, inputs, run_at=None):
    """Capture, cut, and run the steps in PyTorch (segments as graph modules, blocks as the model's blocks);
    ``run_at``: capture with a dynamic batch and run the steps on these inputs instead."""
    calls, _ = record_block_calls(model, inputs)
    batch = inputs["x"].shape[0] if run_at is not None else None
    program = split_at_blocks(capture_with_opaque_blocks(model, inputs, calls, batch=batch))
    steps = plan_releases(program.torch_steps(), program.outputs)
    inputs = run_at if run_at is not None else inputs
    env = {name: inputs[name] for name in program.inputs if name is not None}
    blocks = BlockCalls({c.index: c.block for c in calls}, {c.index: (c.layout, c.outputs) for c in calls})
    with torch.no_grad():
        env = run_steps(steps, env, lambda step, tensors: list(step["segment"].module(*tensors)), blocks)
    assert set(env) == set(program.outputs)  # every other value was dropped once its last reader had run
    return program, env[program.outputs[0]]


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(glue=st.lists(st.sampled_from([0, 1, 2, 3]), min_size=2, max_size=4))
def test_the_cut_program_computes_what_the_model_does(glue):
    torch.manual_seed(0)
    model = StagedDiT(glue).eval()
    inputs = _inputs()
    ec.transform(model, example_inputs=inputs)
    gates = [block.__dict__["forward"] for block in state_of(model).blocks]
    program, got = _program_in_torch(model, inputs)
    with torch.no_grad(), force(model, skip=False, width=1.0):
        expected = model(**inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # one segment before the first block, one after each block with glue that feeds the next, one at the end
    kinds = ["part" if isinstance(s, Segment) else s.block for s in program.steps]
    wanted = ["part"]
    for index, kind in enumerate(glue):
        wanted.append(index)
        if kind or index == len(glue) - 1:
            wanted.append("part")
    assert kinds == wanted
    assert all(isinstance(s, BlockCall) or s.compute_ops() > 0 for s in program.steps)
    # the capture gave every block its gate back
    assert [block.__dict__["forward"] for block in state_of(model).blocks] == gates
    # captured batch-polymorphic, the same cut runs any batch (sizes such as the unpatchify's batch are
    # recomputed in the part that reads them)
    three = resize_batch(inputs, 2, 3)
    _, got = _program_in_torch(model, inputs, run_at=three)
    with torch.no_grad(), force(model, skip=False, width=1.0):
        torch.testing.assert_close(got, model(**three), rtol=0, atol=1e-6)


def _export(model, inputs, out, **options):
    ec.transform(model, example_inputs=inputs)
    randomize_routers(model, scale=0.5)
    return ec.export(model, inputs, out, threads=1, **options)


def _outside_parameters(model):
    paths = [spec.path + "." for spec in state_of(model).specs]
    return [p for name, p in model.named_parameters() if not name.startswith(tuple(paths))]


@pytest.mark.parametrize("name", ["dit", "flux", "qwen_image"])  # qwen_image: complex rotary tables cross parts
def test_the_runtime_runs_no_pytorch_weight_outside_the_blocks(name, tmp_path):
    model, inputs = ARCHITECTURES[name](batch=2)
    out = _export(model, inputs, tmp_path / name)
    manifest = json.loads((out / "manifest.json").read_text())
    graphs = [step for step in manifest["program"]["steps"] if "graph" in step]
    assert graphs and all((out / step["graph"]).is_file() for step in graphs)
    runtime = ec.runtime.load(out, threads=1)
    assert runtime.driver is not None
    with torch.no_grad():
        expected = first_output(model(**inputs))
        for param in _outside_parameters(runtime.model):  # what runs must come from the graphs, not these
            param.fill_(float("nan"))
    got = first_output(runtime(**inputs))
    assert float((got - expected).abs().max()) <= 1e-4
    assert (runtime.driver.calls, runtime.driver.fallbacks) == (1, 0)
    assert ec.stats(runtime).decisions == ec.stats(model).decisions  # its FLOP profiling: the Python forward
    assert manifest["program"]["batch"] == {"dynamic": True, "verified": [1, 2, 3]}
    profiled = runtime.driver.fallbacks
    for rows in (1, 3):  # other batch sizes run the same graphs (blocks: chunked to the exported 1 and 2)
        resized = resize_batch(inputs, 2, rows)
        with torch.no_grad():
            expected = first_output(model(**resized))
        got = first_output(runtime(**resized))
        assert got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-4
    assert (runtime.driver.calls, runtime.driver.fallbacks) == (3, profiled)


def _dense_export(model, inputs, out, **options):
    ec.transform(model, example_inputs=inputs)
    return ec.export(model, inputs, out, buckets=[1.0], threads=1, **options)


def test_calls_unlike_the_exported_one_run_the_python_forward(tmp_path):
    model, inputs = ARCHITECTURES["dit"](batch=2)
    out = _dense_export(model, inputs, tmp_path / "dit", batch_sizes=(1, 2))
    runtime = ec.runtime.load(out, threads=1)
    single = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    structured = dict(inputs, return_dict=True)
    positional = (inputs["hidden_states"], inputs["timestep"], inputs["class_labels"])
    for call in (lambda m: m(**single), lambda m: m(**structured), lambda m: m(*positional, return_dict=False)):
        with torch.no_grad():
            expected = first_output(call(model))
        got = first_output(call(runtime))
        assert float((got - expected).abs().max()) <= 1e-4
    # return_dict=True; batch 1 runs the (dynamic) graphs and the positional call binds to the exported one
    assert (runtime.driver.calls, runtime.driver.fallbacks) == (2, 1)
    mixed = dict(inputs, timestep=inputs["timestep"][:1])  # batch sizes that disagree are not the exported call
    assert runtime.driver.flat_inputs((), mixed) is None and runtime.driver.flat_inputs((), single) is not None
    # every exported argument is a leaf: the values are read off the bound call, as tree_flatten would give them
    assert runtime.driver.flat_call
    values = runtime.driver.flat_inputs((), inputs)
    leaves = pytree.tree_leaves(((), runtime.driver.bind((), inputs)))
    assert len(values) == len(leaves) and all(a is b for a, b in zip(values, leaves))
    nested = dict(inputs, class_labels=(inputs["class_labels"],))  # a container where the export had a leaf
    assert runtime.driver.flat_inputs((), nested) is None
    runtime.driver.enabled = False  # the exported call itself, through the Python forward
    with torch.no_grad():
        expected = first_output(model(**inputs))
    assert float((first_output(runtime(**inputs)) - expected).abs().max()) <= 1e-4
    assert (runtime.driver.calls, runtime.driver.fallbacks) == (2, 2)


class PairedDiT(StagedDiT):
    """Needs an even batch (a classifier-free-guidance pair per image): its forward specialises on the batch
    size, so its outside graphs keep the example's static shapes."""

    def forward(self, x, t, y):
        if x.shape[0] % 2:
            raise ValueError("an even batch")
        return super().forward(x, t, y)


def paired_dit():
    torch.manual_seed(0)
    return PairedDiT().eval()


def test_a_forward_that_specialises_on_its_batch_gets_static_outside_graphs(tmp_path):
    model, inputs = paired_dit(), _inputs()
    out = _dense_export(model, inputs, tmp_path / "paired", base_factory="test_outside_graphs:paired_dit")
    manifest = json.loads((out / "manifest.json").read_text())
    program = manifest["program"]
    assert program["batch"]["dynamic"] is False and "torch.export" in program["batch"]["note"]
    assert [leaf["shape"][0] for leaf in program["call"]["leaves"]] == [2, 2, 2]
    runtime = ec.runtime.load(out, threads=1, base_factory="test_outside_graphs:paired_dit")
    four = resize_batch(inputs, 2, 4)
    for call in (inputs, four):
        with torch.no_grad():
            expected = model(**call)
        assert float((runtime(**call) - expected).abs().max()) <= 1e-4
    assert (runtime.driver.calls, runtime.driver.fallbacks) == (1, 1)


def test_exports_without_outside_graphs_run_as_before(tmp_path):
    model, inputs = ARCHITECTURES["dit"](batch=2)
    out = _dense_export(model, inputs, tmp_path / "dit", outside_graphs=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["program"] is None and "outside_graphs=False" in manifest["program_note"]
    assert not (out / "outside").exists()
    runtime = ec.runtime.load(out, threads=1)
    assert runtime.driver is None
    with torch.no_grad():
        expected = first_output(model(**inputs))
    assert float((first_output(runtime(**inputs)) - expected).abs().max()) <= 1e-4


class BranchyDiT(StagedDiT):
    """Python control flow on a tensor's value outside the blocks: no single graph captures that forward."""

    def forward(self, x, t, y):
        if float(x.mean()) > 10.0:
            x = x * 0.5
        return super().forward(x, t, y)


def branchy_dit():
    torch.manual_seed(0)
    return BranchyDiT().eval()


def test_a_forward_that_does_not_capture_keeps_its_outside_in_pytorch(tmp_path):
    model, inputs = branchy_dit(), _inputs()
    out = _dense_export(model, inputs, tmp_path / "branchy", base_factory="test_outside_graphs:branchy_dit")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["program"] is None and "torch.export" in manifest["program_note"]
    assert not (out / "outside").exists() and not any(name.startswith("outside/") for name in manifest["files"])
    runtime = ec.runtime.load(out, threads=1, base_factory="test_outside_graphs:branchy_dit")
    assert runtime.driver is None
    with torch.no_grad():
        expected = model(**inputs)
    assert float((runtime(**inputs) - expected).abs().max()) <= 1e-4


def test_a_failure_in_the_outside_export_leaves_a_clean_artifact_without_it(tmp_path, monkeypatch):
    from elastic_compile.export import exporter

    def fails_halfway(model, example_inputs, calls, root, threads=None, lookaheads=False):
        (root / "outside").mkdir()
        (root / "outside" / "part_00.onnx").write_bytes(b"half written")
        raise RuntimeError("something torch did not expect\nsecond line")
    monkeypatch.setattr(exporter, "export_outside", fails_halfway)
    model, inputs = ARCHITECTURES["dit"](batch=2)
    out = _dense_export(model, inputs, tmp_path / "dit")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["program"] is None
    assert manifest["program_note"] == "RuntimeError: something torch did not expect"
    assert not (out / "outside").exists()
    runtime = ec.runtime.load(out, threads=1)  # hashes check out: nothing listed is missing or extra
    assert runtime.driver is None

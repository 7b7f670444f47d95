"""ec.runtime.load: the exported runtime reproduces the PyTorch elastic model under the same decisions (ONNX
Runtime backend), with forced plans and with randomized routers giving mixed per-sample plans (batch 4)."""
import warnings

import pytest
import torch

import elastic_compile as ec
from elastic_compile.artifact.integrity import seal
from elastic_compile.cli import main
from elastic_compile.errors import BackendUnavailableError, ConfigError, InputMismatchError
from elastic_compile.backends.tensorrt import tensorrt_available
from elastic_compile.cache import ElasticCacheHooks
from elastic_compile.serve.executor import BlockExecutor, GraphRouter, plan_chunks
from elastic_compile.serve.host_router import HostRouter
from elastic_compile.state import gate_of, state_of
from helpers import randomize_routers, reference_case, sample_inputs
from zoo import ARCHITECTURES, first_output

ATOL = 1e-4
ARCHS = ["dit", "flux", "sd3", "reference"]


class Exported:
    def __init__(self, name, root):
        self.name = name
        self.scheduler = self.sampling = None
        if name == "reference":
            model, self.inputs, self.scheduler, self.sampling = reference_case()
        else:
            model, self.inputs = ARCHITECTURES[name](batch=4)
        self.model = ec.transform(model, example_inputs=self.inputs)
        randomize_routers(self.model, seed=1000)  # exported router graphs hold these weights
        # One static batch size (4) keeps this module fast; every smaller sub-batch is padded up to it. The
        # default sizes (1 and the example batch) are exercised in test_export.py.
        self.dir = ec.export(self.model, self.inputs, root / name, batch_sizes=[4], scheduler=self.scheduler,
                             sampling_config=self.sampling, threads=1)
        self.runtime = ec.runtime.load(self.dir, threads=1)

    def randomize(self, seed):
        randomize_routers(self.model, seed=seed)
        randomize_routers(self.runtime.model, seed=seed)

    def compare(self, inputs=None, skip=None, width=None):
        inputs = inputs or self.inputs
        with torch.no_grad(), ec.force(self.model, skip=skip, width=width):
            expected = first_output(self.model(**inputs))
        with ec.force(self.runtime, skip=skip, width=width):
            got = first_output(self.runtime(**inputs))
        diff = float((got - expected).abs().max())
        assert diff <= ATOL, f"{self.name} skip={skip} width={width}: max |diff| {diff:.3g}"
        # Same per-block, per-sample decisions (ec.stats reads these records; comparing them directly avoids
        # profiling FLOPs for every new input shape).
        assert state_of(self.runtime).calls == state_of(self.model).calls
        return diff


_exports = {}


def _get(name, tmp_path_factory) -> Exported:
    if name not in _exports:
        _exports[name] = Exported(name, tmp_path_factory.mktemp("runtime"))
    item = _exports[name]
    item.randomize(seed=1000)  # tests may randomize routers: back to the exported weights
    return item


@pytest.fixture(params=ARCHS)
def exported(request, tmp_path_factory):
    return _get(request.param, tmp_path_factory)


def test_forced_plans_match_the_pytorch_model(exported):
    state = state_of(exported.model)
    skippable = [s.index for s in state.specs if s.skippable]
    plans = [(False, 1.0)] + [(False, w) for w in state.config.width_buckets[:-1]] + \
            [({skippable[0]}, 0.5), (set(skippable[1::2]), 0.25), (True, None)]
    diffs = [exported.compare(skip=skip, width=width) for skip, width in plans]
    assert max(diffs) <= ATOL


def test_mixed_per_sample_plans_match_with_randomized_routers(exported):
    for seed in range(20):
        exported.randomize(seed)
        exported.compare()
        plans = [[(d.run, d.width) for d in block] for block in ec.stats(exported.model).decisions]
        if any(len(set(p)) > 1 for p in plans):
            break
    assert any(len(set(p)) > 1 for p in plans), "no seed gave mixed per-sample plans"
    assert ec.stats(exported.runtime).executed_flops_fraction == pytest.approx(
        ec.stats(exported.model).executed_flops_fraction)
    # Batches other than the exported one (4): 6 = 4 + 2 (padded), 3 (padded), 1 (padded).
    _, inputs6 = (ARCHITECTURES[exported.name](seed=3, batch=6) if exported.name != "reference" else
                  (None, {**exported.inputs, "hidden_states": torch.randn(6, 1, 8, 8),
                          "timestep": torch.linspace(10, 990, 6), "class_labels": torch.tensor([0, 3, 10, 9, 2, 10])}))
    for inputs in (inputs6, _rows(inputs6, 3), sample_inputs(inputs6, 0, 6)):
        exported.compare(inputs)


def _rows(inputs, count, batch=6):
    return {key: value[:count] if (isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch)
            or (isinstance(value, list) and len(value) == batch) else value for key, value in inputs.items()}


def test_torch_backend_is_the_elastic_model_itself(exported):
    runtime = ec.runtime.load(exported.dir, "torch")
    with torch.no_grad(), ec.force(exported.model, skip=False, width=0.5):
        expected = first_output(exported.model(**exported.inputs))
    with ec.force(runtime, skip=False, width=0.5):
        assert torch.equal(first_output(runtime(**exported.inputs)), expected)
    assert str(ec.report(runtime)) == str(ec.report(exported.model)) == str(ec.report(exported.runtime))


def test_padding_rows_do_not_change_real_rows(exported):
    """One block, directly: 3 rows run in a batch-4 graph (padded) equal the PyTorch block on those 3 rows."""
    state = state_of(exported.runtime.model)
    gate = gate_of(state.blocks[-1])
    executor = gate.original_forward
    assert isinstance(executor, BlockExecutor) and sorted(executor.files[state.dense_bucket]) == [4]
    seen = {}
    handle = state_of(exported.model).blocks[-1].register_forward_pre_hook(
        lambda m, a, k: seen.setdefault("call", (a, k)), with_kwargs=True)
    with torch.no_grad(), ec.force(exported.model, skip=False, width=1.0):
        exported.model(**exported.inputs)
    handle.remove()
    args, kwargs = seen["call"]
    rows = torch.tensor([0, 2, 3])
    pick = lambda v: v.index_select(0, rows) if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 4 else v
    sub_args = tuple(pick(a) for a in args)
    sub_kwargs = {k: (tuple(pick(x) for x in v) if isinstance(v, tuple) else pick(v)) for k, v in kwargs.items()}
    torch_gate = gate_of(state_of(exported.model).blocks[-1])
    for bucket in (0, None) if state.specs[-1].elastic_width else (None,):
        gate.control.bucket = torch_gate.control.bucket = bucket
        try:
            with torch.no_grad():
                got = executor(*sub_args, **sub_kwargs)
                expected = torch_gate.torch_forward(*sub_args, **sub_kwargs)
        finally:
            gate.control.bucket = torch_gate.control.bucket = None
        for g, e in zip(_tensors(got), _tensors(expected)):
            assert g.shape[0] == 3
            torch.testing.assert_close(g, e, atol=ATOL, rtol=0)


def _tensors(value):
    from torch.utils import _pytree as pytree
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def test_plan_chunks():
    assert plan_chunks(3, [1, 4]) == [(3, 4)]
    assert plan_chunks(5, [1, 4]) == [(4, 4), (1, 1)]
    assert plan_chunks(9, [1, 2, 4]) == [(4, 4), (4, 4), (1, 1)]
    assert plan_chunks(6, [2, 4]) == [(4, 4), (2, 2)]
    assert plan_chunks(1, [4]) == [(1, 4)]


def test_onnx_routers_give_the_same_decisions_and_block_weights_are_freed(tmp_path_factory):
    exported = _get("flux", tmp_path_factory)
    runtime = ec.runtime.load(exported.dir, routers="onnx", threads=1)
    assert all(isinstance(gate_of(state_of(runtime.model).blocks[e["block"]]).router, GraphRouter)
               for e in runtime.manifest["routers"])
    with torch.no_grad():
        expected = first_output(exported.model(**exported.inputs))
    got = first_output(runtime(**exported.inputs))
    assert ec.stats(runtime).decisions == ec.stats(exported.model).decisions
    assert float((got - expected).abs().max()) <= ATOL
    params = [p for b in state_of(runtime.model).blocks for n, p in b.named_parameters()
              if not n.startswith("elastic_router.")]
    assert params and all(p.stride() == (0,) * p.ndim for p in params if p.ndim)


def test_block_graphs_summarise_streams_for_the_host_routers(tmp_path_factory, tmp_path):
    """Default routers run on the host and read the token summaries the previous block's graph returned; the
    PyTorch routers ("torch") and an artifact written before summaries existed give the same decisions."""
    import json
    import shutil
    exported = _get("dit", tmp_path_factory)
    state = state_of(exported.runtime.model)
    hosts = [g.router for g in (gate_of(b) for b in state.blocks) if isinstance(g.router, HostRouter)]
    assert len(hosts) == len(state.routers) > 1
    assert all(entry["pooled_outputs"] == [0] for entry in exported.runtime.manifest["blocks"])
    for router in state.routers.values():
        router.reset_to_full_capacity()  # every block runs: each passes its own output on to the next
    summaries = hosts[0].summaries
    summaries.reset()
    first_output(exported.runtime(**exported.inputs))
    # token streams from the previous block's graph; vectors and scalars (timestep) normalised by the first router
    features = len(hosts[0].features)
    assert any(f.kind == "pooled" for f in hosts[0].features)
    assert summaries.hits == features * (len(hosts) - 1) and summaries.misses == features
    exported.randomize(seed=1000)  # mixed per-sample plans: summaries miss where rows were regrouped
    first_output(exported.runtime(**exported.inputs))
    decisions = ec.stats(exported.runtime).decisions
    with torch.no_grad():
        expected = first_output(exported.model(**exported.inputs))
    assert decisions == ec.stats(exported.model).decisions
    for variant in ("torch", "legacy"):
        root = exported.dir
        if variant == "legacy":
            root = tmp_path / "legacy"
            shutil.copytree(exported.dir, root)
            manifest = json.loads((root / "manifest.json").read_text())
            for entry in manifest["blocks"]:
                del entry["pooled_outputs"], entry["summary_eps"]
            (root / "manifest.json").write_text(json.dumps(seal(manifest)))  # sealed: edits are refused otherwise
        runtime = ec.runtime.load(root, threads=1, routers="torch" if variant == "torch" else None)
        got = first_output(runtime(**exported.inputs))
        assert ec.stats(runtime).decisions == decisions, variant
        assert float((got - expected).abs().max()) <= ATOL


def test_graphs_without_router_summaries_return_only_the_block_outputs(tmp_path_factory, tmp_path):
    """``router_summaries=False`` (a dense deployment's baseline): graphs end at the block's outputs, and the
    host routers compute their features themselves with the same decisions and outputs."""
    import onnx
    exported = _get("dit", tmp_path_factory)
    root = ec.export(exported.model, exported.inputs, tmp_path / "plain", batch_sizes=[4], threads=1,
                     router_summaries=False, verify_runtime=False)
    runtime = ec.runtime.load(root, threads=1)
    for entry, summarised in zip(runtime.manifest["blocks"], exported.runtime.manifest["blocks"]):
        assert entry["pooled_outputs"] == []
        plain = onnx.load(root / entry["graphs"]["0"]["4"], load_external_data=False)
        with_summaries = onnx.load(exported.dir / summarised["graphs"]["0"]["4"], load_external_data=False)
        assert len(with_summaries.graph.output) == (len(plain.graph.output) + len(summarised["pooled_outputs"])
                                                    + ("lookahead" in summarised))  # the next router's logits
    got = first_output(runtime(**exported.inputs))
    with torch.no_grad():
        expected = first_output(exported.model(**exported.inputs))
    assert float((got - expected).abs().max()) <= ATOL
    assert ec.stats(runtime).decisions == ec.stats(exported.model).decisions
    hosts = [gate_of(b).router for b in state_of(runtime.model).blocks if gate_of(b).router is not None]
    shared = sum(f.kind != "pooled" for f in hosts[0].features)  # the timestep's features: the only hits
    assert hosts[0].summaries.hits == shared * (len(hosts) - 1)


def test_host_routers_are_refused_with_tensorrt(tmp_path_factory):
    exported = _get("dit", tmp_path_factory)
    with pytest.raises(ConfigError, match="routers='torch'"):
        ec.runtime.load(exported.dir, "tensorrt", routers="host")


def test_inputs_of_another_shape_are_a_typed_error_or_run_in_pytorch(tmp_path_factory):
    """other_shapes="error" (default): a typed error; "torch": the same outputs and decisions as the PyTorch
    elastic model, one warning for all such calls, the exported shape still through the graphs."""
    exported = _get("flux", tmp_path_factory)
    _, inputs = ARCHITECTURES["flux"](batch=4)
    other = dict(inputs, hidden_states=torch.randn(4, 9, 8), img_ids=torch.randn(9, 3))
    with pytest.raises(InputMismatchError, match="static shapes"):
        exported.runtime(**other)
    assert exported.runtime.exported_inputs["batch_sizes"] == [4]
    with pytest.raises(ConfigError):
        ec.runtime.load(exported.dir, threads=1, other_shapes="torch", free_torch_weights=True)
    with pytest.raises(ConfigError):
        ec.runtime.load(exported.dir, threads=1, other_shapes="any")
    runtime = ec.runtime.load(exported.dir, threads=1, other_shapes="torch")
    for seed in (3, 4):
        randomize_routers(exported.model, seed=seed)
        randomize_routers(runtime.model, seed=seed)
        with torch.no_grad():
            expected = first_output(exported.model(**other))
        with pytest.warns(RuntimeWarning, match="not exported") if seed == 3 else warnings.catch_warnings():
            if seed == 4:
                warnings.simplefilter("error")  # warned once per runtime, not per call
            got = first_output(runtime(**other))
        assert float((got - expected).abs().max()) <= ATOL
        assert state_of(runtime).calls == state_of(exported.model).calls
    shapes = gate_of(state_of(runtime).blocks[0]).original_forward.other_shapes
    before = shapes.calls
    assert before > 0
    with torch.no_grad(), ec.force(exported.model, skip=False, width=0.5):
        expected = first_output(exported.model(**inputs))
    with ec.force(runtime, skip=False, width=0.5):
        got = first_output(runtime(**inputs))
    assert float((got - expected).abs().max()) <= ATOL
    assert shapes.calls == before  # the exported shape ran in the graphs, not in PyTorch


def test_tensorrt_backend_unavailable_is_a_typed_error(tmp_path_factory):
    exported = _get("dit", tmp_path_factory)
    if tensorrt_available()[0]:
        pytest.skip("TensorRT is installed: covered by test_tensorrt.py")
    with pytest.raises(BackendUnavailableError, match="TensorRT"):
        ec.runtime.load(exported.dir, "tensorrt")


def test_sampling_and_feature_cache_on_the_runtime_match_the_pytorch_model(tmp_path_factory, tmp_path, capsys):
    exported = _get("reference", tmp_path_factory)
    from elastic_compile.sampling import sample
    exported.randomize(7)
    kwargs = dict(num_inference_steps=3, guidance_scale=2.0, seed=3)
    expected = sample(exported.model, exported.scheduler, [1, 4, 7], exported.sampling, **kwargs)
    got = exported.runtime.sample([1, 4, 7], **kwargs)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    ec.apply_feature_cache(exported.model)
    ec.apply_feature_cache(exported.runtime)
    try:
        expected = sample(exported.model, exported.scheduler, [1, 4, 7], exported.sampling,
                          hooks=ElasticCacheHooks(exported.model), **kwargs)
        got = exported.runtime.sample([1, 4, 7], hooks=ElasticCacheHooks(exported.runtime), **kwargs)
        torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    finally:
        ec.cache.remove_feature_cache(exported.model)
        ec.cache.remove_feature_cache(exported.runtime)
    assert main(["run", str(exported.dir), "--classes", "0,1,2", "--steps", "1", "--out", str(tmp_path / "g.png"),
                 "--threads", "1", "--width", "0.5", "--thread-pool", "per_session"]) == 0  # shared: process-wide
    printed = capsys.readouterr().out
    assert (tmp_path / "g.png").stat().st_size > 0 and "3 images" in printed
    # exported at batch 4, sampled as one CFG batch of 6: the outside graphs' batch is dynamic
    assert "ops outside the blocks as graphs in 1 of 1 forwards" in printed


def test_run_cli_with_cuda_graphs(tmp_path_factory, tmp_path, capsys, monkeypatch):
    """``run --cuda-graph``: typed errors without a GPU or with another backend; with the capture replaced by an
    eager stand-in (what a replay computes), the same images as the plain torch run, feature cache included."""
    import elastic_compile.serve.cuda_graph as cuda_graph
    from helpers import stand_in_capture
    exported = _get("reference", tmp_path_factory)
    common = ["run", str(exported.dir), "--classes", "0,3", "--steps", "3", "--threads", "1", "--cache", "on"]
    assert main(common + ["--cuda-graph", "--out", str(tmp_path / "x.pt")]) == 1
    assert "--backend torch" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(common + ["--backend", "torch", "--cuda-graph", "--out", str(tmp_path / "x.pt")]) == 1
        assert "CUDA" in capsys.readouterr().err
    monkeypatch.setattr(cuda_graph, "capture_cuda_graph", lambda model, inputs, cache_contexts=None, **options:
                        stand_in_capture(model, inputs, clone_outputs=False, contexts=cache_contexts or (None,)))
    for cfg in ("batch", "separate"):
        assert main(common + ["--backend", "torch", "--cfg", cfg, "--out", str(tmp_path / "plain.pt")]) == 0
        assert main(common + ["--backend", "torch", "--cfg", cfg, "--cuda-graph", "--out", str(tmp_path / "g.pt")]) == 0
        assert "one CUDA graph per forward" in capsys.readouterr().out
        torch.testing.assert_close(torch.load(tmp_path / "g.pt"), torch.load(tmp_path / "plain.pt"), atol=1e-5, rtol=0)


def test_single_thread_router_runs_on_one_thread_and_restores_the_pool():
    from elastic_compile.serve.executor import SingleThreadRouter
    seen = []

    class Router:
        num_widths, num_actions = 2, 1

        def __call__(self, arguments):
            seen.append(torch.get_num_threads())
            if arguments.get("fail"):
                raise ValueError("router failed")
            return "decisions"
    router = Router()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert SingleThreadRouter(router)({}) == "decisions"
        with pytest.raises(ValueError):
            SingleThreadRouter(router)({"fail": True})
        assert seen == [1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _threads_seen_in_forward(runtime, inputs, fail=False) -> list[int]:
    """PyTorch's thread count when the model's forward starts and inside the first block's gate."""
    seen = []

    def record(module, args, kwargs=None):
        seen.append(torch.get_num_threads())
        if fail:
            raise ValueError("forward failed")
    first_block = state_of(runtime).blocks[0]
    handles = [runtime.model.register_forward_pre_hook(record), first_block.register_forward_pre_hook(record)]
    try:
        with ec.force(runtime, skip=False, width=0.5):
            runtime(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_onnxruntime_runtime_runs_its_pytorch_parts_on_one_thread_and_restores_it(tmp_path_factory, capsys):
    exported = _get("dit", tmp_path_factory)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runtime = ec.runtime.load(exported.dir)  # sessions open during the first forward, at 1 PyTorch thread
        assert runtime.torch_threads == 1
        assert _threads_seen_in_forward(runtime, exported.inputs) == [1, 1] and torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="forward failed"):
            _threads_seen_in_forward(runtime, exported.inputs, fail=True)
        assert torch.get_num_threads() == 2
        # ONNX Runtime keeps the thread count of load time, not the forward's
        assert {g.session.get_session_options().intra_op_num_threads for g in runtime.backend._graphs.values()} == {2}
        assert _threads_seen_in_forward(ec.runtime.load(exported.dir, torch_threads=None), exported.inputs) == [2, 2]
        assert _threads_seen_in_forward(ec.runtime.load(exported.dir, "torch"), exported.inputs) == [2, 2]
        assert _threads_seen_in_forward(ec.runtime.load(exported.dir, "torch", torch_threads=1), exported.inputs) == [1, 1]
        with pytest.raises(ConfigError, match="torch_threads"):
            ec.runtime.load(exported.dir, torch_threads=0)
        with pytest.raises(ConfigError, match="torch_threads"):
            ec.runtime.load(exported.dir, torch_threads="one")
        assert main(["run", str(exported.dir), "--classes", "0", "--torch-threads", "-1"]) == 1
        assert "--torch-threads" in capsys.readouterr().err  # refused by the command line, before loading
    finally:
        torch.set_num_threads(before)


def test_onnxruntime_runtime_outputs_do_not_depend_on_its_pytorch_threads(tmp_path_factory):
    exported = _get("flux", tmp_path_factory)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outputs = []
        for threads in (1, None):
            runtime = ec.runtime.load(exported.dir, torch_threads=threads)
            with ec.force(runtime, skip={1}, width=0.5):
                outputs.append(first_output(runtime(**exported.inputs)))
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(before)


def test_iobinding_runtime_equals_the_numpy_path(tmp_path_factory):
    """``io_binding="on"`` (what CUDAExecutionProvider uses) on the CPU provider: the same outputs and decisions."""
    exported = _get("dit", tmp_path_factory)
    bound = ec.runtime.load(exported.dir, threads=1, io_binding="on", providers=["CPUExecutionProvider"])
    randomize_routers(bound.model, seed=1000)
    for skip, width in ((False, 1.0), (None, None), (False, 0.5)):
        with ec.force(exported.runtime, skip=skip, width=width):
            expected = first_output(exported.runtime(**exported.inputs))
        with ec.force(bound, skip=skip, width=width):
            got = first_output(bound(**exported.inputs))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        assert state_of(bound).calls == state_of(exported.runtime).calls
    bound.close()

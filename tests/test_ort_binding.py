"""ONNX Runtime through IOBinding (issue 25, item 7): torch tensors bound by pointer, outputs written into torch
tensors on the inputs' device; on the CPU provider it must equal the NumPy path. Providers are named and checked."""
import onnx
import pytest
import torch
from hypothesis import given, settings, strategies as st
from onnx import TensorProto, helper

from elastic_compile.backends.onnxruntime import OnnxRuntimeBackend, OrtGraph, check_providers, provider_device
from elastic_compile.cli import main
from elastic_compile.errors import BackendUnavailableError, ConfigError, InputMismatchError


def _graph_file(path):
    """in_0 (batch, 3) float, in_1 (3,) float, in_2 (batch,) int64 -> out_0 = relu(in_0 + in_1) (batch, 3),
    out_1 = in_2 * 2 (batch,), out_2 = nonzero(in_2) (1, unknown: the fallback that ONNX Runtime allocates)."""
    two = helper.make_tensor("two", TensorProto.INT64, [], [2])
    nodes = [helper.make_node("Add", ["in_0", "in_1"], ["sum"]), helper.make_node("Relu", ["sum"], ["out_0"]),
             helper.make_node("Mul", ["in_2", "two"], ["out_1"]), helper.make_node("NonZero", ["in_2"], ["out_2"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("in_0", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("in_1", TensorProto.FLOAT, [3]),
         helper.make_tensor_value_info("in_2", TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info("out_0", TensorProto.FLOAT, ["batch", 3]),
         helper.make_tensor_value_info("out_1", TensorProto.INT64, ["batch"]),
         helper.make_tensor_value_info("out_2", TensorProto.INT64, [1, None])],
        initializer=[two])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    path = _graph_file(tmp_path_factory.mktemp("ort") / "g.onnx")
    return OrtGraph(path, threads=1, io_binding="off"), OrtGraph(path, threads=1, io_binding="on")


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.booleans(), st.integers(0, 2 ** 31))
def test_cpu_iobinding_equals_the_numpy_path(graphs, batch, strided, seed):
    plain, bound = graphs
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, batch, generator=g).t() if strided else torch.randn(batch, 3, generator=g)  # strided: a view
    inputs = [x, torch.randn(3, generator=g), torch.randint(-1, 2, (batch,), generator=g)]
    expected = plain(inputs)
    got = bound(inputs)
    assert len(got) == 3
    for e, o in zip(expected, got):
        assert o.dtype == e.dtype and o.device == torch.device("cpu")
        assert torch.equal(o, e)


def test_bound_outputs_are_fresh_tensors_and_bad_inputs_are_typed(graphs):
    _, bound = graphs
    inputs = [torch.ones(2, 3), torch.zeros(3), torch.tensor([1, 0])]
    first = bound(inputs)[0]
    second = bound([torch.full((2, 3), 2.0), torch.zeros(3), torch.tensor([1, 0])])[0]
    assert torch.equal(first, torch.ones(2, 3)) and torch.equal(second, torch.full((2, 3), 2.0))
    with pytest.raises(InputMismatchError):
        bound([torch.ones(2, 3), torch.zeros(4), torch.tensor([1, 0])])
    with pytest.raises(InputMismatchError, match="dtype"):
        bound([torch.ones(2, 3, dtype=torch.complex64), torch.zeros(3), torch.tensor([1, 0])])


def test_providers_are_checked_and_name_the_device():
    assert check_providers(None) == ["CPUExecutionProvider"]
    assert provider_device(["CPUExecutionProvider"]) == torch.device("cpu")
    assert provider_device([("CUDAExecutionProvider", {"device_id": 1})]) == torch.device("cuda", 1)
    with pytest.raises(BackendUnavailableError, match="CPUExecutionProvider"):
        OnnxRuntimeBackend(threads=1, providers=["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError):
        OnnxRuntimeBackend(threads=1, io_binding="sometimes")
    assert OnnxRuntimeBackend(threads=1, providers=["CPUExecutionProvider"]).device == torch.device("cpu")


def test_cli_providers(tmp_path, capsys):
    argv = ["run", str(tmp_path / "missing"), "--classes", "1", "--out", str(tmp_path / "g.png")]
    assert main(argv + ["--providers", "CPUExecutionProvider", "--backend", "torch"]) == 1
    assert "--providers" in capsys.readouterr().err
    assert main(argv + ["--providers", ","]) == 1
    assert "--providers" in capsys.readouterr().err

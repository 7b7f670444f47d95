"""Export rewrite passes: complex arithmetic lowered to real arithmetic (Qwen-Image rotary embedding), constant
folding that keeps weights as named initializers."""
import onnx
import pytest
import torch

import elastic_compile as ec
from elastic_compile.errors import UnsupportedComplexOpError
from elastic_compile.artifact.layout import CallLayout, OutputLayout
from elastic_compile.export.onnx_io import complex_outputs_of, export_graph
from elastic_compile.export.passes import export_without_complex, has_complex, lower_complex
from elastic_compile.artifact.graphs import graph_inputs
from elastic_compile.export.program import BlockProgram
from elastic_compile.export.verify import run_ort
from elastic_compile.state import state_of
from zoo import ARCHITECTURES


class Rotary(torch.nn.Module):
    """The complex-multiply rotary pattern plus other complex ops the pass must lower."""

    def forward(self, x, freqs, scale):
        z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))      # (B, S, H, D/2)
        f = freqs.unsqueeze(1)                                                   # (S, 1, D/2)
        rotated = z * f                                                          # complex * complex
        mixed = (rotated + f.conj() * 2.0 - z / (f + 3.0)) * scale.unsqueeze(-1).unsqueeze(-1)  # add/sub/div, * real
        both = torch.cat([rotated, mixed.transpose(1, 2).transpose(1, 2)], dim=-1)
        out = torch.view_as_real(both).flatten(3)
        return out.type_as(x), rotated.abs() + torch.view_as_real(mixed)[..., 1]


def _example():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, 8, generator=g)
    angles = torch.randn(5, 4, generator=g)
    freqs = torch.polar(torch.ones_like(angles), angles)
    return x, freqs, torch.rand(2, 5, generator=g) + 0.5


def test_lowered_graph_has_no_complex_values_and_matches_eager():
    x, freqs, scale = _example()
    program = torch.export.export(Rotary(), (x, freqs, scale), strict=False)
    gm = program.module()
    assert has_complex(gm)
    indices = lower_complex(gm)
    assert indices == [1] and not has_complex(gm)
    with torch.no_grad():
        expected = Rotary()(x, freqs, scale)
        got = gm(x, torch.view_as_real(freqs), scale)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
    # For any input values, not only the traced ones.
    x2, freqs2, scale2 = torch.randn_like(x), torch.polar(torch.rand(5, 4) + 0.5, torch.randn(5, 4)), torch.rand(2, 5)
    with torch.no_grad():
        for e, o in zip(Rotary()(x2, freqs2, scale2), gm(x2, torch.view_as_real(freqs2), scale2)):
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)


def test_lowered_rotary_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    x, freqs, scale = _example()
    model, complex_inputs = export_graph(Rotary(), [x, freqs, scale], "rotary test")
    assert complex_inputs == [1]
    onnx.save(model, tmp_path / "rotary.onnx")
    onnx.checker.check_model(str(tmp_path / "rotary.onnx"), full_check=True)
    got = run_ort(tmp_path / "rotary.onnx", [x, freqs, scale], torch.float32, complex_inputs)
    for e, o in zip(Rotary()(x, freqs, scale), got):
        torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)


def test_unknown_complex_op_is_a_typed_error():
    class Exp(torch.nn.Module):
        def forward(self, x):
            return torch.view_as_real(torch.exp(torch.view_as_complex(x)))

    program = torch.export.export(Exp(), (torch.randn(3, 2),), strict=False)
    with pytest.raises(UnsupportedComplexOpError, match="exp"):
        export_without_complex(program, [torch.randn(3, 2)])


class RotaryTable(torch.nn.Module):
    """Complex values from a complex buffer (a rotary table, as Qwen-Image's positional embedding keeps one),
    returned complex: the parts outside a model's blocks hand such tables to the blocks."""

    def __init__(self):
        super().__init__()
        angles = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
        self.register_buffer("table", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def forward(self, x):
        rows = self.table.to(torch.complex64)[1:4].split([1, 3], dim=1)
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return rows[1] * 2.0, (z * rows[0].squeeze(1)).abs()


@pytest.mark.parametrize("batch", [2, 5])
def test_complex_buffers_and_outputs_cross_as_real_pairs(tmp_path, batch):
    module = RotaryTable()
    example = [torch.randn(2, 3, 2)]
    model, complex_inputs = export_graph(module, example, "table", dynamic_dims=[[0]], complex_outputs=True)
    assert complex_inputs == [] and complex_outputs_of(model) == [0]
    onnx.save(model, tmp_path / "table.onnx")
    onnx.checker.check_model(str(tmp_path / "table.onnx"), full_check=True)
    inputs = [torch.randn(batch, 3, 2)]  # 5: a batch the graph was not traced at
    table, magnitude = run_ort(tmp_path / "table.onnx", inputs, torch.float32, [])
    expected_table, expected_magnitude = module(*inputs)
    torch.testing.assert_close(torch.view_as_complex(table), expected_table, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(magnitude, expected_magnitude, atol=1e-5, rtol=1e-5)
    with pytest.raises(UnsupportedComplexOpError, match="complex output"):  # blocks must return real values
        export_graph(module, example, "table")


def test_real_graphs_pass_through_unchanged():
    program = torch.export.export(torch.nn.Linear(3, 2), (torch.randn(4, 3),), strict=False)
    same, inputs, outputs = export_without_complex(program, [torch.randn(4, 3)])
    assert same is program and inputs == [] and outputs == []


@pytest.fixture(scope="module")
def qwen_block():
    model, inputs = ARCHITECTURES["qwen_image"](batch=2)
    ec.transform(model, example_inputs=inputs)
    state = state_of(model)
    block = state.blocks[0]
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a, k: seen.setdefault("call", (a, dict(k))), with_kwargs=True)
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        model(**inputs)
    handle.remove()
    args, kwargs = seen["call"]
    layout = CallLayout.record(args, kwargs, batch=2)
    with torch.no_grad(), ec.force(model, skip=False, width=1.0):
        output = block(*args, **kwargs)
    return state, block, layout, OutputLayout.record(output), layout.tensors_of(args, kwargs)


def test_qwen_image_block_with_complex_rotary_exports_and_matches_torch(qwen_block, tmp_path):
    state, block, layout, outputs, tensors = qwen_block
    assert any(leaf.complex for leaf in layout.inputs)  # the rotary tables are complex64 inputs
    program = BlockProgram(block, 1, state.dense_bucket, layout, outputs)  # width bucket 0.5
    model, complex_inputs = export_graph(program, tensors, "qwen block")
    assert complex_inputs == [k for k, leaf in enumerate(layout.inputs) if leaf.complex]
    onnx.save(model, tmp_path / "qwen.onnx")
    onnx.checker.check_model(str(tmp_path / "qwen.onnx"), full_check=True)
    with torch.no_grad():
        expected = program(*tensors)
    got = run_ort(tmp_path / "qwen.onnx", tensors, torch.float32, complex_inputs)
    for e, o in zip(expected, got):
        torch.testing.assert_close(o, e, atol=1e-4, rtol=1e-4)
    assert all(not t.is_complex() for t in graph_inputs(tensors, torch.float32, complex_inputs))


def test_fold_constants_keeps_weights_named_and_removes_sequence_ops(qwen_block):
    state, block, layout, outputs, tensors = qwen_block
    program = BlockProgram(block, state.dense_bucket, state.dense_bucket, layout, outputs)
    model, _ = export_graph(program, tensors, "qwen block")
    names = {init.name for init in model.graph.initializer}
    matrices = {f"block.{n}" for n, p in block.named_parameters() if p.ndim >= 2 and not n.startswith("elastic_router.")}
    assert matrices and matrices <= names  # no weight was folded into an anonymous (e.g. pre-transposed) constant
    assert not {n.op_type for n in model.graph.node} & {"SplitToSequence", "SequenceAt", "ConcatFromSequence"}
    assert [i.name for i in model.graph.input] == [f"in_{k}" for k in range(len(tensors))]
    assert not any(len(n.metadata_props) for n in model.graph.node)  # debug info stripped


class SqueezeMost(torch.nn.Module):
    """Squeezes that PyTorch partly or wholly ignores (dims not of size 1), as in PixArt's caption projection."""

    def forward(self, x):
        y = torch.squeeze(x, 1) + 1.0                  # (2, 16, 1, 32): dim 1 is 16, nothing removed
        return torch.squeeze(y, (0, 2)) * 2.0, y.squeeze(-1)  # dims 0 and 2: only 2 removed; -1 is 32


def test_noop_squeeze_dims_are_dropped_and_the_graph_exports(tmp_path):
    from elastic_compile.export.passes import drop_noop_squeeze_dims
    x = torch.randn(2, 16, 1, 32)
    gm = torch.export.export(SqueezeMost(), (x,), strict=False).module()
    expected = SqueezeMost()(x)
    assert drop_noop_squeeze_dims(gm) == 3
    squeezes = [n for n in gm.graph.nodes if n.op == "call_function" and "squeeze" in str(n.target)]
    assert [list(n.args[1]) for n in squeezes] == [[2]]
    for got, want in zip(gm(x), expected):
        assert got.shape == want.shape and torch.equal(got, want)
    proto, _ = export_graph(gm, [x], "squeezes")
    path = tmp_path / "squeeze.onnx"
    onnx.save_model(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    for got, want in zip(run_ort(path, [x], torch.float32, []), expected):
        torch.testing.assert_close(got, want)

"""The per-call shortcuts of the runtime path (binding arguments, flattening a block call, packing outputs, feeding
ONNX Runtime) give exactly what the general code gives."""
import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.utils import _pytree as pytree

from elastic_compile.capture.record import SignatureBinder, bind_to_signature
from elastic_compile.errors import InputMismatchError
from elastic_compile.artifact.layout import CallLayout, OutputLayout
from elastic_compile.backends.onnxruntime import _to_numpy

P = inspect.Parameter
KIND_ORDER = [P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.VAR_POSITIONAL, P.KEYWORD_ONLY, P.VAR_KEYWORD]


@st.composite
def signatures(draw):
    """Valid signatures over names p0..p5 (any mix of kinds, defaults, *args, **kwargs)."""
    params, has_default = [], False
    for i in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(KIND_ORDER))
        if params and KIND_ORDER.index(kind) < KIND_ORDER.index(params[-1].kind):
            kind = params[-1].kind
        if kind in (P.VAR_POSITIONAL, P.VAR_KEYWORD) and any(p.kind == kind for p in params):
            continue
        if kind == P.VAR_KEYWORD and params and params[-1].kind == P.VAR_KEYWORD:
            continue
        default = P.empty
        if kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD):
            if has_default or draw(st.booleans()):
                default, has_default = i, True
        elif kind == P.KEYWORD_ONLY and draw(st.booleans()):
            default = i
        params.append(P(f"p{i}", kind, default=default))
    return inspect.Signature(params)


@settings(max_examples=300, deadline=None)
@given(signatures(), st.integers(0, 7), st.lists(st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5", "extra"]),
                                                   unique=True, max_size=4))
def test_signature_binder_binds_every_call_as_bind_to_signature(signature, positional, keywords):
    args = tuple(f"a{i}" for i in range(positional))
    kwargs = {name: f"k_{name}" for name in keywords}
    expected = bind_to_signature(signature, args, kwargs)
    got = SignatureBinder(signature)(args, kwargs)
    assert got == expected
    assert list(got) == list(expected)  # same order too


def test_signature_binder_on_a_block_forward():
    def forward(self_like, hidden_states, temb=None, *, image_rotary_emb=None, **extra):
        pass
    binder = SignatureBinder(inspect.signature(forward))
    x, t = torch.ones(1), torch.zeros(1)
    assert binder((0, x), {"temb": t}) == {"self_like": 0, "hidden_states": x, "temb": t}
    assert binder((0,), {"image_rotary_emb": 1, "hidden_states": x}) == {
        "self_like": 0, "hidden_states": x, "image_rotary_emb": 1}
    assert binder((0, x), {"unknown": 3}) == bind_to_signature(inspect.signature(forward), (0, x), {"unknown": 3})


def _layout(args, kwargs, batch=2):
    return CallLayout.record(args, kwargs, batch)


def test_flatten_reads_plain_calls_directly_and_matches_tree_flatten():
    x, c = torch.randn(2, 4, 8), torch.randn(2, 8)
    layout = CallLayout.from_dict(_layout((x,), {"c": c, "scale": 1.0}).to_dict())  # as a runtime loads it
    for call in [((x,), {"c": c, "scale": 1.0}), ((x[:1],), {"c": c[:1], "scale": 1.0})]:
        values = layout.flatten(*call)
        assert values == pytree.tree_leaves((call[0], call[1]))
    assert layout.flat_shape() == (1, ("c", "scale"))
    assert layout.flatten((x, c), {"scale": 1.0}) is None  # other structure
    assert layout.flatten((x,), {"scale": 1.0, "c": c}) is None  # keywords in another order: another treespec
    assert layout.flatten(((x,),), {"c": c, "scale": 1.0}) is None  # a container where a leaf was
    with pytest.raises(InputMismatchError):
        layout.match((x, c), {"scale": 1.0}, "blocks.0")
    with pytest.raises(InputMismatchError):
        layout.match((x,), {"c": c, "scale": 2.0}, "blocks.0")  # a baked-in constant changed
    with pytest.raises(InputMismatchError):
        layout.match((torch.randn(2, 5, 8),), {"c": c, "scale": 1.0}, "blocks.0")  # static shapes
    tensors, batch = layout.match((x[:1],), {"c": c[:1], "scale": 1.0}, "blocks.0")
    assert batch == 1 and tensors[0].data_ptr() == x.data_ptr()


def test_flatten_of_nested_calls_takes_tree_flatten():
    x, cos, sin = torch.randn(2, 4, 8), torch.randn(4, 8), torch.randn(4, 8)
    layout = _layout((x,), {"rotary": (cos, sin)})
    assert layout.flatten((x,), {"rotary": (cos, sin)}) == [x, cos, sin]
    assert layout.flatten((x,), {"rotary": [cos, sin]}) is None  # a list is another container
    tensors, batch = layout.match((x,), {"rotary": (cos, sin)}, "blocks.0")
    assert batch == 2 and len(tensors) == 3


def test_pack_returns_a_single_output_as_is_and_casts_only_where_needed():
    out = torch.randn(2, 3)
    single = OutputLayout.from_dict(OutputLayout.record(out).to_dict())
    assert single.pack([out]) is out
    assert single.pack([out.double()]).dtype == torch.float32
    assert single.tensors_of(out) == [out]
    pair = OutputLayout.record((out, None))
    packed = pair.pack([out.half()])
    assert isinstance(packed, tuple) and packed[1] is None
    assert packed[0].dtype == torch.float32 and torch.allclose(packed[0], out, atol=1e-2)


def test_to_numpy_is_a_view_when_it_can_be_and_a_copy_when_it_must():
    x = torch.randn(3, 4)
    assert np.shares_memory(_to_numpy(x), x.numpy())
    strided = x.t()
    assert np.array_equal(_to_numpy(strided), strided.contiguous().numpy())
    assert _to_numpy(strided).flags["C_CONTIGUOUS"]
    grad = torch.randn(2, requires_grad=True)
    assert np.array_equal(_to_numpy(grad), grad.detach().numpy())


@settings(max_examples=100, deadline=None)
@given(signatures(), st.lists(st.tuples(st.integers(0, 7), st.lists(
    st.sampled_from(["p0", "p1", "p2", "p3", "p4", "p5", "extra"]), unique=True, max_size=4)), min_size=1, max_size=4))
def test_one_signature_binder_binds_repeated_calls_as_bind_to_signature(signature, calls):
    """The binder remembers how each call shape binds: later calls of a shape, with other values, bind alike."""
    binder = SignatureBinder(signature)
    for round_ in range(2):
        for positional, keywords in calls:
            args = tuple(f"a{i}_{round_}" for i in range(positional))
            kwargs = {name: f"k_{name}_{round_}" for name in keywords}
            expected = bind_to_signature(signature, args, kwargs)
            got = binder(args, kwargs)
            assert got == expected and list(got) == list(expected)


LEAF_KINDS = st.sampled_from(["batched", "shared", "const"])


@st.composite
def layouts_and_calls(draw):
    """A recorded layout (batched and shared tensors, constants) and a call that may differ from it in one way."""
    batch = draw(st.integers(1, 3))
    kinds = draw(st.lists(LEAF_KINDS, min_size=1, max_size=5))
    if "batched" not in kinds:
        kinds[0] = "batched"
    values = []
    for k, kind in enumerate(kinds):
        if kind == "batched":
            values.append(torch.randn((batch,) + tuple(draw(st.lists(st.integers(1, 4), max_size=2)))))
        elif kind == "shared":
            values.append(torch.randn(tuple(draw(st.lists(st.integers(batch + 1, 5), min_size=1, max_size=2)))))
        else:
            values.append(draw(st.sampled_from([None, 1, 2.5, "gelu", True])))
    args, kwargs = tuple(values[:1]), {f"k{i}": v for i, v in enumerate(values[1:])}
    layout = CallLayout.from_dict(CallLayout.record(args, kwargs, batch).to_dict())
    change = draw(st.sampled_from(["none", "rows", "shape", "dtype", "const", "subclass", "container"]))
    at = draw(st.integers(0, len(values) - 1))
    rows = draw(st.integers(1, batch))
    call = [v[:rows] if kinds[k] == "batched" else v for k, v in enumerate(values)]
    if change == "rows":
        call = [v[:1].expand((batch + 1,) + tuple(v.shape[1:])) if kinds[k] == "batched" and k == at else v
                for k, v in enumerate(call)]
    elif change == "shape" and isinstance(call[at], torch.Tensor):
        call[at] = call[at].unsqueeze(-1)
    elif change == "dtype" and isinstance(call[at], torch.Tensor):
        call[at] = call[at].double()
    elif change == "const" and kinds[at] == "const":
        call[at] = "another"
    elif change == "subclass" and isinstance(call[at], torch.Tensor):
        call[at] = torch.nn.Parameter(call[at], requires_grad=False)
    elif change == "container":
        call[at] = (call[at],)
    return layout, (tuple(call[:1]), {f"k{i}": v for i, v in enumerate(call[1:])})


@settings(max_examples=300, deadline=None)
@given(layouts_and_calls())
def test_fast_match_agrees_with_match_or_leaves_the_call_to_it(case):
    """``fast_match`` returns what ``match`` returns for the calls it takes, and None (never a wrong match) for
    every other call: other rows where they must agree, shapes, dtypes, constants, tensor subclasses, containers."""
    layout, (args, kwargs) = case
    try:
        expected = layout.match(args, kwargs, "blocks.0")
    except InputMismatchError:
        expected = None
    fast = layout.fast_match(args, kwargs)
    if fast is not None:
        assert expected is not None
        assert fast[1] == expected[1] and len(fast[0]) == len(expected[0])
        assert all(a is b for a, b in zip(fast[0], expected[0]))
    if expected is not None and all(type(t) is torch.Tensor for t in expected[0]):
        assert fast is not None  # the usual call takes the fast path


def test_describe_inputs_reads_flat_calls_directly_and_matches_tree_map():
    from elastic_compile.state import TensorMeta, describe_inputs
    x, t = torch.randn(2, 3), torch.tensor([1, 2])
    flat = describe_inputs((x,), {"t": t, "flag": True, "none": None})
    assert flat == ((TensorMeta((2, 3), torch.float32, x.device),),
                    {"t": TensorMeta((2,), torch.int64, t.device), "flag": True, "none": None})
    nested = describe_inputs((x,), {"pair": (t, 3)})
    assert nested == ((TensorMeta((2, 3), torch.float32, x.device),),
                      {"pair": (TensorMeta((2,), torch.int64, t.device), 3)})


def test_tensors_of_a_single_output_before_any_pack():
    """The driver's output layouts never pack: a single-tensor output is still returned without a pytree walk."""
    out = torch.randn(2, 3)
    layout = OutputLayout.from_dict(OutputLayout.record(out).to_dict())
    assert layout.tensors_of(out) == [out] and layout._single
    pair = OutputLayout.from_dict(OutputLayout.record((out, None)).to_dict())
    assert pair.tensors_of((out, None)) == [out]

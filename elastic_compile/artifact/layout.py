"""How one block call maps to the flat tensor inputs and outputs of its static-shape graphs.

A block is called as ``forward(*args, **kwargs)``. :class:`CallLayout` records, from one real call, the pytree
structure of ``(args, kwargs)`` and, per leaf, either a *tensor input* (graph input ``k``: shape, dtype, whether
its leading dimension is the batch, whether it is complex) or a *constant* baked into the graph (``None``, ints,
floats, strings, bools). :class:`OutputLayout` records the block's output structure (``None`` leaves included,
as in :func:`elastic_compile.capture.treespec.flatten_output`).

Batch rule (the one the gate uses to split a batch into per-plan sub-batches): a tensor input is *batched* when
it has at least one dimension and its leading dimension equals the call's batch; every other tensor is shared
by all samples and must keep its exported shape exactly. Both layouts are JSON-serialisable (stored in the
export manifest) so a runtime can rebuild them without example inputs.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch.utils import _pytree as pytree

from ..capture.treespec import JSON_SCALARS, PLAIN_LEAVES, flatten_output, loaded_treespec
from ..errors import ExportError, InputMismatchError


def cycle_rows(tensor: torch.Tensor, size: int) -> torch.Tensor:
    """``tensor`` with ``size`` rows: rows ``0..size-1`` of it, taken cyclically (an example resized to another
    batch)."""
    return tensor.index_select(0, torch.arange(size, device=tensor.device) % tensor.shape[0])


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise ExportError("a torch dtype name", repr(name), "The manifest is corrupt; export again.")
    return value


@dataclass
class Leaf:
    """One leaf of a flattened call: ``kind`` is "tensor" (graph input ``input``) or "const" (``value``)."""

    kind: str
    input: int | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    batched: bool = False
    complex: bool = False
    value: Any = None


@dataclass
class CallLayout:
    """The flat-input layout of one block call (see the module docstring)."""

    spec: str
    leaves: list[Leaf]
    batch: int
    _flat_shape: tuple | bool | None = field(default=None, repr=False, compare=False)
    _checks: list | None = field(default=None, repr=False, compare=False)

    # construction ----------------------------------------------------------------------------------------
    @classmethod
    def record(cls, args: tuple, kwargs: dict, batch: int) -> "CallLayout":
        values, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        leaves, count = [], 0
        for value in values:
            if isinstance(value, torch.Tensor):
                batched = value.ndim > 0 and int(value.shape[0]) == batch
                leaves.append(Leaf("tensor", count, list(value.shape), dtype_name(value.dtype), batched, value.is_complex()))
                count += 1
            elif isinstance(value, JSON_SCALARS):
                leaves.append(Leaf("const", value=value))
            else:
                raise ExportError("block arguments that are tensors, containers of tensors or plain scalars",
                                  f"a {type(value).__name__} argument",
                                  "Such a value cannot be baked into a static graph; report the model.")
        try:
            spec = pytree.treespec_dumps(treespec)
        except Exception as exc:
            raise ExportError("block arguments in standard containers (tuple, list, dict)", f"{exc}",
                              "Report the model: its blocks take arguments in a custom container.") from exc
        return cls(spec, leaves, batch)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "batch": self.batch, "leaves": [asdict(leaf) for leaf in self.leaves]}

    @classmethod
    def from_dict(cls, data: dict) -> "CallLayout":
        return cls(data["spec"], [Leaf(**leaf) for leaf in data["leaves"]], int(data["batch"]))

    @property
    def treespec(self) -> pytree.TreeSpec:
        return loaded_treespec(self.spec)

    @property
    def inputs(self) -> list[Leaf]:
        return [leaf for leaf in self.leaves if leaf.kind == "tensor"]

    def signature(self) -> str:
        """Equal for calls that a single exported graph can serve (structure, constants, shapes, dtypes)."""
        return json.dumps(self.to_dict(), sort_keys=True, default=repr)

    # export side -----------------------------------------------------------------------------------------
    def tensors_of(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The tensor leaves of a call with this layout, in graph-input order (no checks)."""
        return [v for v in pytree.tree_leaves((tuple(args), dict(kwargs))) if isinstance(v, torch.Tensor)]

    def rebuild(self, tensors: Sequence[torch.Tensor]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` from graph inputs: constants reinserted, structure restored."""
        values = [tensors[leaf.input] if leaf.kind == "tensor" else leaf.value for leaf in self.leaves]
        flat = self.flat_shape()
        if flat:  # every argument a leaf (the usual block call): no pytree walk between two block graphs
            count, names = flat
            return tuple(values[:count]), dict(zip(names, values[count:]))
        args, kwargs = pytree.tree_unflatten(values, self.treespec)
        return tuple(args), dict(kwargs)

    def flat_shape(self) -> tuple[int, tuple[str, ...]] | None:
        """``(positional count, keyword names)`` when every recorded argument is a leaf, else None."""
        if self._flat_shape is None:
            args, kwargs = self.treespec.children()
            leaves = [args.child(k) for k in range(args.num_children)] + \
                     [kwargs.child(k) for k in range(kwargs.num_children)]
            self._flat_shape = ((args.num_children, tuple(kwargs.context))
                                if all(child.is_leaf() for child in leaves) else False)
        return self._flat_shape or None

    def resized(self, tensors: Sequence[torch.Tensor], size: int) -> list[torch.Tensor]:
        """The inputs for batch ``size``: batched inputs take rows ``0..size-1`` cyclically from the example."""
        return [cycle_rows(t, size) if leaf.batched else t for leaf, t in zip(self.inputs, tensors)]

    # runtime side ----------------------------------------------------------------------------------------
    def flatten(self, args: tuple, kwargs: dict) -> list | None:
        """The leaves of a runtime call in this layout's order, or None when its structure differs.

        A call of plain leaves (tensors, scalars) in the recorded arguments and keywords is read off directly:
        the structure test is done once per (argument count, keyword names), not by ``tree_flatten`` per call
        (a few hundred microseconds of cold Python between two block graphs)."""
        if (len(args), tuple(kwargs)) == self.flat_shape():
            values = [*args, *kwargs.values()]
            if all(isinstance(v, PLAIN_LEAVES) for v in values):
                return values
        values, treespec = pytree.tree_flatten((tuple(args), dict(kwargs)))
        return values if treespec == self.treespec else None

    def match(self, args: tuple, kwargs: dict, block: str) -> tuple[list[torch.Tensor], int]:
        """Graph inputs of a runtime call and its (sub-)batch size; raises InputMismatchError when the call
        differs from the exported one in anything but the batch size."""
        return self.match_values(self.flatten(args, kwargs), block)

    def match_values(self, values: list | None, block: str) -> tuple[list[torch.Tensor], int]:
        """:meth:`match` on the leaves from :meth:`flatten` (None: another structure)."""
        if values is not None and len(values) == len(self.leaves):
            matched = self._fast_match(values)
            if matched is not None:
                return matched
        return self._checked_match(values, block)

    def fast_match(self, args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], int] | None:
        """:meth:`match` for the usual runtime call, in few operations per leaf: the recorded arguments and
        keywords as plain leaves, every tensor a plain ``torch.Tensor`` (no subclass: fake tensors,
        parameters) with the recorded dtype and shape. None for any other call, which :meth:`match` handles
        (and reports). Between two block graphs each Python step runs with cold caches."""
        if (len(args), tuple(kwargs)) != self.flat_shape():
            return None
        return self._fast_match((*args, *kwargs.values()), exact=True)

    def _fast_match(self, values, exact: bool = False) -> tuple[list[torch.Tensor], int] | None:
        """:meth:`match_values` for a call that matches (``exact``: tensors of type ``torch.Tensor`` only), no
        messages, no string compares; None at the first difference, which :meth:`_checked_match` reports."""
        checks = self._checks
        if checks is None:
            checks = self._checks = [
                (0, leaf.value, None, 0) if leaf.kind == "const" else
                (1 if leaf.batched else 2, tuple(leaf.shape[1:]) if leaf.batched else tuple(leaf.shape),
                 dtype_from_name(leaf.dtype), len(leaf.shape))
                for leaf in self.leaves]
        tensors, batch = [], None
        for (kind, expected, dtype, ndim), value in zip(checks, values):
            if kind == 0:
                if isinstance(value, torch.Tensor) or value != expected:
                    return None
                continue
            if (type(value) is not torch.Tensor if exact else not isinstance(value, torch.Tensor)) or value.dtype != dtype:
                return None
            shape = value.shape
            if kind == 1:
                if len(shape) != ndim or shape[1:] != expected or (batch is not None and shape[0] != batch):
                    return None
                batch = shape[0]
            elif shape != expected:
                return None
            tensors.append(value)
        return tensors, batch if batch is not None else self.batch

    def _checked_match(self, values: list | None, block: str) -> tuple[list[torch.Tensor], int]:
        if values is None:
            raise InputMismatchError(f"block {block} called with the argument structure it was exported with",
                                     "a different structure (other arguments or containers)",
                                     "Call the model the way it was called at export, or export again.")
        tensors, batch = [], None
        for leaf, value in zip(self.leaves, values):
            if leaf.kind == "const":
                if isinstance(value, torch.Tensor) or value != leaf.value:
                    raise InputMismatchError(f"block {block} argument value {leaf.value!r} (baked into the graphs)",
                                             f"{value!r}", "Export again with inputs that use this value.")
                continue
            if not isinstance(value, torch.Tensor):
                raise InputMismatchError(f"a tensor for graph input {leaf.input} of block {block}",
                                         f"{type(value).__name__}", "Call the model the way it was exported.")
            shape = value.shape
            expected = leaf.shape
            if leaf.batched:
                if batch is None:
                    batch = shape[0] if shape else None
                ok = len(shape) == len(expected) and list(shape[1:]) == expected[1:] and shape[0] == batch
            else:
                ok = list(shape) == expected
            if not ok or dtype_name(value.dtype) != leaf.dtype:
                raise InputMismatchError(
                    f"graph input {leaf.input} of block {block} shaped {['B'] + expected[1:] if leaf.batched else expected}"
                    f" ({leaf.dtype})", f"{list(shape)} ({dtype_name(value.dtype)})",
                    "Exported graphs have static shapes: export again with inputs of this resolution/length.")
            tensors.append(value)
        return tensors, batch if batch is not None else self.batch


@dataclass
class OutputLayout:
    """Block output structure: per flattened leaf, "tensor" (graph output ``k`` of dtype) or "none"."""

    spec: str
    leaves: list[dict]
    _dtypes: list | None = field(default=None, repr=False, compare=False)
    _single: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def record(cls, output: Any) -> "OutputLayout":
        values, treespec = flatten_output(output)
        leaves, count = [], 0
        for value in values:
            if isinstance(value, torch.Tensor):
                leaves.append({"kind": "tensor", "output": count, "dtype": dtype_name(value.dtype)})
                count += 1
            elif value is None:
                leaves.append({"kind": "none"})
            else:
                raise ExportError("block outputs made of tensors and None", f"a {type(value).__name__} output",
                                  "Report the model.")
        return cls(pytree.treespec_dumps(treespec), leaves)

    def to_dict(self) -> dict:
        return {"spec": self.spec, "leaves": self.leaves}

    @classmethod
    def from_dict(cls, data: dict) -> "OutputLayout":
        return cls(data["spec"], list(data["leaves"]))

    @property
    def treespec(self) -> pytree.TreeSpec:
        return loaded_treespec(self.spec)

    def _prepare(self) -> None:
        """Per leaf the dtype the block returns (None: a ``None`` leaf), and whether the output is one tensor."""
        self._dtypes = [dtype_from_name(leaf["dtype"]) if leaf["kind"] == "tensor" else None for leaf in self.leaves]
        self._single = self.treespec.is_leaf()

    def pack(self, tensors: Sequence[torch.Tensor], device: torch.device | None = None) -> Any:
        """The block's output from graph outputs, each cast back to the dtype the PyTorch block returns (and moved
        to ``device`` when given); casts and moves happen only where needed."""
        if self._dtypes is None:
            self._prepare()
        values = []
        for leaf, dtype in zip(self.leaves, self._dtypes):
            if dtype is None:
                values.append(None)
                continue
            value = tensors[leaf["output"]]
            if value.dtype != dtype or (device is not None and value.device != device):
                value = value.to(device=device, dtype=dtype)
            values.append(value)
        return values[0] if self._single else pytree.tree_unflatten(values, self.treespec)

    def tensors_of(self, output: Any) -> list[torch.Tensor]:
        if self._dtypes is None:
            self._prepare()
        if self._single and isinstance(output, torch.Tensor):
            return [output]
        values, _ = flatten_output(output)
        return [v for v in values if isinstance(v, torch.Tensor)]

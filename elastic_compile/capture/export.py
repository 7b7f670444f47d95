"""Export one block with torch.export and evaluate its graph against the live module's weights.

Capture falls back before it gives up on a block: plain ``torch.export`` (non-strict) first, then the same without
autograd (ops with no backward on the device, such as flex attention on CPU, trace only so); for forwards that
read tensor values (``.item()``, ``.tolist()`` of mask lengths: data-dependent sizes that export cannot guard on)
``torch.export.draft_export``, which answers those questions from the real example values, so the graph is
specialised to the example's sizes (the analyses only evaluate it on that example); last, torch.export with the
submodules that neither exporter traces kept as opaque calls (:mod:`.opaque_submodules`). Modules handed to a block as
call arguments (a rotary-embedding module passed to every block) are bound to a wrapper before export, so the
graph reads their buffers as attributes instead of expecting them as inputs. Arguments torch.export cannot take
as inputs at all (a flex-attention ``BlockMask`` handed to every block, as AnyFlow-FAR does: not a pytree of
tensors and scalars) are bound the same way, as constants of the example call: the graph bakes their tensors in,
which is what the analyses need (they evaluate the graph on that example only).
"""
from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import fx, nn
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from ..errors import CaptureError

#: prefix of the wrapper attribute holding the block itself (stripped from the graph's attribute names)
_INNER = "inner"
#: prefix of the wrapper attributes holding module-valued call arguments
_ARG = "call_argument_"


@dataclass
class ExportedBlock:
    """A block's graph (ATen ops, ``get_attr`` nodes named by parameter FQN) and how to feed it.

    ``input_names[i]`` is the block argument (a name of ``forward``'s parameters) that flat placeholder ``i``
    belongs to; ``output_spec`` is the pytree structure of the block's output. ``argument_modules``: modules the
    block got as call arguments (by wrapper attribute name; ``get_attr`` targets starting with that name read
    them), left out of the flat inputs. ``method``: how the graph was captured ("export", "draft_export" or
    "export_opaque_parts": torch.export with ``opaque_parts`` as opaque calls).
    """

    graph_module: fx.GraphModule
    placeholders: list[fx.Node]
    input_names: list[str | None]
    output_spec: pytree.TreeSpec
    in_spec: pytree.TreeSpec = None
    argument_modules: dict[str, nn.Module] = field(default_factory=dict)
    method: str = "export"
    #: submodules (names under the block) kept as opaque calls (:mod:`.opaque_submodules`); empty normally
    opaque_parts: list[str] = field(default_factory=list)

    def flat_inputs(self, args: tuple, kwargs: dict) -> list:
        args, kwargs = _without_modules(args, kwargs)
        return list(fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec))

    def output_node(self) -> fx.Node:
        return next(n for n in self.graph_module.graph.nodes if n.op == "output")

    def output_leaves(self) -> list[fx.Node]:
        return list(pytree.tree_leaves(self.output_node().args[0]))

    def attribute(self, module, target: str):
        """The live value a ``get_attr`` target names: on ``module`` or on a module-valued call argument."""
        head, _, rest = target.partition(".")
        if head in self.argument_modules:
            obj, path = self.argument_modules[head], rest
        else:
            obj, path = module, target
        try:
            for part in path.split(".") if path else ():
                obj = getattr(obj, part)
            return obj
        except AttributeError:  # a constant the exporter lifted out of the forward (torch.tensor(lengths))
            obj = self.graph_module
            for part in target.split("."):
                obj = getattr(obj, part)
            return obj


#: leaves torch.export (non-strict) takes as inputs or as constants of the call
_EXPORTABLE_LEAVES = (torch.Tensor, type(None), bool, int, float, str, nn.Module, torch.ScriptObject)


def _is_bound(value) -> bool:
    """Whether a call argument is bound to the export wrapper instead of passed as an input: a module, or a value
    with a leaf torch.export refuses as an input (a ``BlockMask``, whose mask function no pytree can hold)."""
    return isinstance(value, nn.Module) or not all(isinstance(leaf, _EXPORTABLE_LEAVES)
                                                   for leaf in pytree.tree_leaves(value))


def _without_modules(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call without its bound arguments (modules and non-exportable values, held by the export wrapper)."""
    return (tuple(a for a in args if not _is_bound(a)), {k: v for k, v in kwargs.items() if not _is_bound(v)})


def _has_bound(args: tuple, kwargs: dict) -> bool:
    return any(_is_bound(a) for a in (*args, *kwargs.values()))


class _BoundModules(nn.Module):
    """Calls ``inner`` with the bound arguments put back in their places (positions / keywords): modules as
    submodules (the graph reads their buffers by attribute), other values as plain constants."""

    def __init__(self, block: nn.Module, args: tuple, kwargs: dict):
        super().__init__()
        self.add_module(_INNER, block)
        self.positions = {i: f"{_ARG}{i}" for i, a in enumerate(args) if _is_bound(a)}
        self.keywords = {k: f"{_ARG}{k}" for k, v in kwargs.items() if _is_bound(v)}
        self.constants = {}
        for name, value in [(self.positions[i], args[i]) for i in self.positions] + \
                [(self.keywords[k], kwargs[k]) for k in self.keywords]:
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            else:
                self.constants[name] = value
        self.count = len(args)

    def bound(self, name: str):
        return self.constants[name] if name in self.constants else getattr(self, name)

    @property
    def module_names(self) -> list[str]:
        return [name for name in (*self.positions.values(), *self.keywords.values()) if name not in self.constants]

    def forward(self, *args, **kwargs):
        rest = iter(args)
        full = [self.bound(self.positions[i]) if i in self.positions else next(rest) for i in range(self.count)]
        kwargs.update({k: self.bound(name) for k, name in self.keywords.items()})
        return getattr(self, _INNER)(*full, **kwargs)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporters log pages (graphs, data-dependent questions) when they fail or fall back; the block's notes
    say what happened instead, so logging is off while they run (restored after)."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]


def export_block(block: nn.Module, args: tuple, kwargs: dict, bound_names: dict[str, Any]) -> ExportedBlock:
    """Capture ``block`` on one recorded call: torch.export, else draft_export, else torch.export with its
    untraceable submodules opaque (module docstring). Raises CaptureError with every attempt's message when none
    captures it."""
    module_arguments = _has_bound(args, kwargs)
    root = _BoundModules(block, args, kwargs) if module_arguments else block
    flat_args, flat_kwargs = _without_modules(args, kwargs)
    errors = []
    program, method, opaque_parts = None, "export", []
    with _quiet_exporter():
        try:
            program = torch.export.export(root, tuple(flat_args), dict(flat_kwargs), strict=False)
        except Exception as exc:
            errors.append(f"torch.export: {_first_line(exc)}")
            try:  # ops without a backward on this device (flex attention on CPU) trace only without autograd
                with torch.no_grad():
                    program = torch.export.export(root, tuple(flat_args), dict(flat_kwargs), strict=False)
            except Exception as exc2:
                errors.append(f"torch.export without grad: {_first_line(exc2)}")
        if program is None:
            try:
                program, method = torch.export.draft_export(root, tuple(flat_args), dict(flat_kwargs)), "draft_export"
            except Exception as exc2:
                errors.append(f"draft_export: {_first_line(exc2)}")
        if program is None:
            program, opaque_parts = _export_with_opaque_parts(block, root, args, kwargs, errors)
            method = "export_opaque_parts"
    if program is None:
        raise CaptureError(f"a block ({type(block).__name__}) that torch.export can capture", "; ".join(errors),
                           "The block is left dense; report the model.")
    gm = program.module()
    argument_modules = {}
    if module_arguments:
        argument_modules = {name: getattr(root, name) for name in root.module_names}
        for node in gm.graph.nodes:
            # the block's own weights, named as on the block; constants the exporter lifted keep their place
            if node.op == "get_attr" and str(node.target).startswith(_INNER + ".") \
                    and _resolves(block, str(node.target)[len(_INNER) + 1:]):
                node.target = str(node.target)[len(_INNER) + 1:]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # Tag every leaf of each argument with the argument's name, then flatten exactly as the graph does.
    name_of = {id(v): k for k, v in bound_names.items()}
    tagged_args = tuple(_tag(a, name_of.get(id(a))) for a in flat_args)
    tagged_kwargs = {k: _tag(v, k) for k, v in flat_kwargs.items()}
    try:
        names = list(fx_pytree.tree_flatten_spec((tagged_args, tagged_kwargs), gm._in_spec))
    except Exception as exc:
        raise CaptureError("graph inputs that follow the block's arguments", _first_line(exc),
                           "The block is left dense; report the model.") from exc
    names = [n if isinstance(n, _Tag) else None for n in names]
    if len(names) != len(placeholders):
        raise CaptureError("one graph input per flattened argument", f"{len(placeholders)} vs {len(names)}",
                           "The block is left dense; report the model.")
    return ExportedBlock(gm, placeholders, [n.name if n is not None else None for n in names], gm._out_spec,
                         gm._in_spec, argument_modules, method, opaque_parts)


def _resolves(module: nn.Module, path: str) -> bool:
    """Whether ``path`` names an attribute of ``module`` (a lifted constant of the graph does not)."""
    try:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part)
        return True
    except AttributeError:
        return False


def _exports(module: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether torch.export (non-strict) captures ``module`` on this call."""
    root = _BoundModules(module, args, kwargs) if _has_bound(args, kwargs) else module
    flat_args, flat_kwargs = _without_modules(args, kwargs)
    try:
        with torch.no_grad():
            torch.export.export(root, tuple(flat_args), dict(flat_kwargs), strict=False)
        return True
    except Exception:
        return False


def _export_with_opaque_parts(block: nn.Module, root: nn.Module, args: tuple, kwargs: dict, errors: list[str]):
    """(program, opaque part names) of the export with untraceable submodules opaque, or (None, []) with the
    reason appended to ``errors`` (see :mod:`.opaque_submodules`)."""
    from .opaque_submodules import submodules_as_opaque_calls, untraceable_submodules
    flat_args, flat_kwargs = _without_modules(args, kwargs)
    try:
        parts = untraceable_submodules(block, args, kwargs, _exports)
        if not parts:
            errors.append("opaque parts: no submodule alone fails to export")
            return None, []
        with submodules_as_opaque_calls(parts), torch.no_grad():
            program = torch.export.export(root, tuple(flat_args), dict(flat_kwargs), strict=False)
        return program, sorted(parts)
    except Exception as exc:
        errors.append(f"export with opaque parts: {_first_line(exc)}")
        return None, []


class _Tag:
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


def _tag(value, name):
    return pytree.tree_map(lambda _: _Tag(name), value)


class GraphEvaluator(fx.Interpreter):
    """Runs an exported block graph with the *live* weights of ``module`` and optional per-node overrides.

    ``override(node, args, kwargs, compute)`` may return a value to use instead of the op's result; it gets
    ``compute`` to run the original op. ``get_attr`` reads the current parameter of ``module`` by name, so
    evaluations follow in-place rewrites (permutations) of the weights.
    """

    def __init__(self, exported: ExportedBlock, module: nn.Module, override: Callable | None = None):
        super().__init__(exported.graph_module, garbage_collect_values=True)
        self.exported = exported
        self.live = module
        self.override = override

    def get_attr(self, target, args, kwargs):
        return self.exported.attribute(self.live, target)

    def call_module(self, target, args, kwargs):
        if target.startswith("_guards"):
            return None
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        if self.override is None:
            return target(*args, **kwargs)
        return self.override(self.current_node, args, kwargs, lambda: target(*args, **kwargs))

    def run_node(self, n):
        self.current_node = n
        return super().run_node(n)

    def evaluate(self, flat_inputs: list) -> list:
        out = self.run(*flat_inputs, enable_io_processing=False)
        return list(pytree.tree_leaves(out))

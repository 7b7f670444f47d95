"""Checks of an export manifest's values, before any of them is used.

The manifest's own hash (:mod:`.integrity`) catches edits; these checks catch a manifest that is intact but
makes no sense for this reader: a newer writer, an opset or dtype this runtime cannot run, batch sizes or width
buckets without graphs, indices out of range, shapes that are not shapes, paths leaving the artifact. Each
failure is an ArtifactError naming the manifest, the entry, what was expected and what was found.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from ..capture.treespec import loaded_treespec
from ..errors import ArtifactError
from ..version import __version__
from .graphs import DTYPES
from .integrity import inside

#: The ONNX opsets a runtime of this version runs (the exporter writes the last one).
OPSETS = (19, 20)
OPSET = OPSETS[-1]
MAX_BATCH = 1 << 16
_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def version_tuple(text: str) -> tuple[int, ...] | None:
    """``"1.2.3rc1"`` -> ``(1, 2, 3)``; None when it does not start with a number."""
    parts = []
    for piece in text.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
    return tuple(parts) or None


class Checker:
    """Typed checks of one manifest's entries; ``where`` names the entry in every message."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, expected: str, found: Any):
        shown = repr(found)
        raise ArtifactError(f"{where} in {self.file} to be {expected}", shown if len(shown) < 200 else shown[:200] + "...",
                            "The manifest does not match what this elastic_compile writes: export again (with this "
                            "version), or load it with the version that wrote it.")

    def get(self, entry: Any, key: str, kind, where: str = ""):
        """``entry[key]`` when present and of ``kind`` (``where``: the entry's own name, "" at the top)."""
        name = f"{where}.{key}" if where else key
        if not isinstance(entry, dict) or key not in entry:
            self.fail(name, "present", "missing")
        value = entry[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.fail(name, "an integer", value)
        if kind is not int and kind is not None and not isinstance(value, kind):
            self.fail(name, f"a {getattr(kind, '__name__', kind)}", value)
        return value

    def index(self, value: Any, size: int, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < size:
            self.fail(where, f"an index in [0, {size})", value)
        return value

    def ints(self, values: Any, where: str, low: int = 0, high: int | None = None) -> list[int]:
        if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            self.fail(where, "a list of integers", values)
        if any(v < low or (high is not None and v > high) for v in values):
            self.fail(where, f"integers in [{low}, {high if high is not None else 'inf'}]", values)
        return values

    def path(self, root: Path, value: Any, where: str) -> Path:
        return inside(root, value, where, self.file)

    def treespec(self, value: Any, where: str) -> None:
        try:
            loaded_treespec(value)
        except Exception:  # any parse failure of the structure string: torch raises several kinds
            self.fail(where, "a pytree structure written by torch.utils._pytree.treespec_dumps", value)

    def leaf_count(self, leaves: list, spec: str, where: str) -> None:
        """One entry in ``leaves`` per leaf of the (already checked) structure ``spec``."""
        if len(leaves) != loaded_treespec(spec).num_leaves:
            self.fail(f"{where}.leaves", f"one entry per leaf of {where}.spec ({loaded_treespec(spec).num_leaves})",
                      len(leaves))

    def dtype(self, value: Any, where: str) -> None:
        import torch

        if not isinstance(value, str) or not isinstance(getattr(torch, value, None), torch.dtype):
            self.fail(where, "a torch dtype name (e.g. 'float32')", value)


def validate_export(manifest: dict, file: Path) -> None:
    """Raise ArtifactError (naming ``file`` and the entry) unless the export manifest's values are usable."""
    c, root = Checker(file), file.parent
    versions = c.get(manifest, "versions", dict)
    writer = versions.get("elastic_compile")
    if not isinstance(writer, str) or version_tuple(writer) is None:
        c.fail("versions.elastic_compile", "the elastic_compile version that wrote it", writer)
    if version_tuple(writer) > version_tuple(__version__):
        raise ArtifactError(f"an export written by elastic_compile <= {__version__} ({file})", f"version {writer}",
                            f"Upgrade elastic_compile to {writer} or later to load it.")
    if c.get(manifest, "opset", int) not in OPSETS:
        c.fail("opset", f"one of {OPSETS}", manifest["opset"])
    if c.get(manifest, "dtype", str) not in DTYPES:
        c.fail("dtype", f"one of {sorted(DTYPES)}", manifest["dtype"])
    widths = c.get(c.get(manifest, "config", dict), "width_buckets", list, "config")
    if not widths or any(isinstance(w, bool) or not isinstance(w, (int, float)) for w in widths):
        c.fail("config.width_buckets", "a list of numbers", widths)
    indices = c.ints(c.get(manifest, "bucket_indices", list), "bucket_indices", 0, len(widths) - 1)
    dense = c.get(manifest, "dense_bucket", int)
    if dense != len(widths) - 1 or dense not in indices or indices != sorted(set(indices)):
        c.fail("bucket_indices / dense_bucket", f"increasing bucket indices including the dense one ({len(widths) - 1})",
               (indices, dense))
    if c.get(manifest, "buckets", list) != [widths[i] for i in indices]:
        c.fail("buckets", f"the widths of bucket_indices {[widths[i] for i in indices]}", manifest["buckets"])
    sizes = c.ints(c.get(manifest, "batch_sizes", list), "batch_sizes", 1, MAX_BATCH)
    if not sizes or sizes != sorted(set(sizes)):
        c.fail("batch_sizes", "a non-empty increasing list of batch sizes", sizes)
    source = c.get(manifest, "source", dict)
    c.get(source, "fingerprint", str, "source")
    base = c.get(source, "base", dict, "source")
    if c.get(base, "kind", str, "source.base") not in ("diffusers", "factory"):
        c.fail("source.base.kind", "'diffusers' or 'factory'", base["kind"])
    c.path(root, c.get(base, "path", str, "source.base"), "source.base.path")
    if not _IDENTIFIER.fullmatch(c.get(base, "class", str, "source.base")):
        c.fail("source.base.class", "a class name", base["class"])
    c.path(root, c.get(manifest, "elastic", str), "elastic")
    blocks = c.get(manifest, "blocks", list)
    seen = {}  # block index -> tensor inputs of its graphs
    for k, entry in enumerate(blocks):
        seen.update([_block(c, root, entry, f"blocks[{k}]", indices, dense, sizes)])
    if len(seen) != len(blocks):
        c.fail("blocks[*].index", "distinct block indices", [b.get("index") for b in blocks])
    for k, entry in enumerate(c.get(manifest, "routers", list)):
        if c.get(entry, "block", int, f"routers[{k}]") not in seen:
            c.fail(f"routers[{k}].block", f"one of the exported blocks {sorted(seen)}", entry["block"])
        c.path(root, c.get(entry, "file", str, f"routers[{k}]"), f"routers[{k}].file")
        names = c.get(entry, "inputs", list, f"routers[{k}]")
        if not all(isinstance(n, str) for n in names):
            c.fail(f"routers[{k}].inputs", "argument names", names)
    used = c.get(c.get(manifest, "runs_in_torch", dict), "block_parameters_used_outside", list,
                 "runs_in_torch")
    if not all(isinstance(n, str) for n in used):
        c.fail("runs_in_torch.block_parameters_used_outside", "parameter names", used)
    c.get(manifest, "backends", dict)
    if manifest.get("program") is not None:
        _program(c, root, c.get(manifest, "program", dict), seen)
    sampling = manifest.get("sampling") or {}
    if not isinstance(sampling, dict):
        c.fail("sampling", "an object or null", sampling)
    if sampling.get("scheduler") is not None:
        scheduler = c.get(sampling, "scheduler", dict, "sampling")
        c.path(root, c.get(scheduler, "path", str, "sampling.scheduler"), "sampling.scheduler.path")
        if not _IDENTIFIER.fullmatch(c.get(scheduler, "class", str, "sampling.scheduler")):
            c.fail("sampling.scheduler.class", "a class name", scheduler["class"])
    if sampling.get("config") is not None:
        c.path(root, sampling["config"], "sampling.config")


def _block(c: Checker, root: Path, entry: Any, where: str, indices: list[int], dense: int,
           sizes: list[int]) -> tuple[int, int]:
    """Checks one block entry; returns its index and how many tensors its graphs take."""
    index = c.get(entry, "index", int, where)
    if index < 0:
        c.fail(f"{where}.index", "a block index >= 0", index)
    c.get(entry, "path", str, where)
    c.path(root, c.get(entry, "weights", str, where), f"{where}.weights")
    layout = c.get(entry, "layout", dict, where)
    c.treespec(c.get(layout, "spec", str, f"{where}.layout"), f"{where}.layout.spec")
    if c.get(layout, "batch", int, f"{where}.layout") < 1:
        c.fail(f"{where}.layout.batch", "a batch size >= 1", layout["batch"])
    leaves = c.get(layout, "leaves", list, f"{where}.layout")
    c.leaf_count(leaves, layout["spec"], f"{where}.layout")
    tensors = _numbered(c, leaves, f"{where}.layout.leaves", "input", "const")
    for leaf in tensors:
        c.ints(c.get(leaf, "shape", list, where), f"{where}.layout.leaves[*].shape", 0, 1 << 31)
        for flag in ("batched", "complex"):
            c.get(leaf, flag, bool, f"{where}.layout.leaves[*]")
    if any(isinstance(leaf.get("value"), (list, dict)) for leaf in leaves if leaf["kind"] == "const"):
        c.fail(f"{where}.layout.leaves[*].value", "JSON scalars for constants", leaves)
    inputs = len(tensors)
    outputs = c.get(entry, "outputs", dict, where)
    c.treespec(c.get(outputs, "spec", str, f"{where}.outputs"), f"{where}.outputs.spec")
    c.leaf_count(c.get(outputs, "leaves", list, f"{where}.outputs"), outputs["spec"], f"{where}.outputs")
    count = len(_numbered(c, outputs["leaves"], f"{where}.outputs.leaves", "output", "none"))
    c.ints(entry.get("complex_inputs", []), f"{where}.complex_inputs", 0, inputs - 1)
    c.ints(entry.get("pooled_outputs", []), f"{where}.pooled_outputs", 0, count - 1)
    eps = entry.get("summary_eps", 0.0)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        c.fail(f"{where}.summary_eps", "a finite number >= 0", eps)
    ahead = entry.get("lookahead")
    if ahead is not None:
        _lookahead(c, ahead, f"{where}.lookahead", inputs, count)
    graphs = c.get(entry, "graphs", dict, where)
    buckets = sorted(int(b) for b in graphs if isinstance(b, str) and b.isdigit())
    if len(buckets) != len(graphs) or dense not in buckets or not set(buckets) <= set(indices):
        c.fail(f"{where}.graphs", f"graphs for the dense bucket {dense} and only exported buckets {indices}",
               sorted(graphs))
    for bucket, files in graphs.items():
        if not isinstance(files, dict) or sorted(files) != sorted(str(n) for n in sizes):
            c.fail(f"{where}.graphs[{bucket}]", f"one graph per batch size {sizes}", files)
        for size, name in files.items():
            c.path(root, name, f"{where}.graphs[{bucket}][{size}]")
    return index, inputs


def _numbered(c: Checker, leaves: list, where: str, number: str, other: str) -> list[dict]:
    """The "tensor" leaves, checked to carry a dtype and ``number`` 0, 1, ... in order; every other leaf must be
    of kind ``other``."""
    tensors = []
    for k, leaf in enumerate(leaves):
        kind = c.get(leaf, "kind", str, f"{where}[{k}]")
        if kind == "tensor":
            if c.get(leaf, number, int, f"{where}[{k}]") != len(tensors):
                c.fail(f"{where}[{k}].{number}", f"{number} {len(tensors)} (tensor leaves in order)", leaf[number])
            c.dtype(leaf.get("dtype"), f"{where}[{k}].dtype")
            tensors.append(leaf)
        elif kind != other:
            c.fail(f"{where}[{k}].kind", f"'tensor' or '{other}'", kind)
    return tensors


def _lookahead(c: Checker, ahead: Any, where: str, inputs: int, outputs: int) -> None:
    if c.get(ahead, "block", int, where) < 0:
        c.fail(f"{where}.block", "a block index", ahead["block"])
    for k, source in enumerate(c.get(ahead, "sources", list, where)):
        if (not isinstance(source, list) or len(source) != 2 or source[0] not in ("in", "out")
                or isinstance(source[1], bool) or not isinstance(source[1], int)
                or not 0 <= source[1] < (inputs if source[0] == "in" else outputs)):
            c.fail(f"{where}.sources[{k}]", f"['in', k < {inputs}] or ['out', k < {outputs}]", source)


def _program(c: Checker, root: Path, program: dict, blocks: dict[int, int]) -> None:
    """The forward as steps (see ``export/outside.py``): types, and that every value a step or the result reads is
    an argument, a parameter or an earlier step's output."""
    call = c.get(program, "call", dict, "program")
    c.treespec(c.get(call, "spec", str, "program.call"), "program.call.spec")
    if not all(isinstance(n, str) for n in c.get(call, "names", list, "program.call")):
        c.fail("program.call.names", "argument names", call["names"])
    leaves = c.get(call, "leaves", list, "program.call")
    c.leaf_count(leaves, call["spec"], "program.call")
    available = set()
    for k, leaf in enumerate(leaves):
        at = f"program.call.leaves[{k}]"
        kind = c.get(leaf, "kind", str, at)
        if kind == "tensor":
            shape = c.get(leaf, "shape", list, at)
            if any(s != "batch" and (isinstance(s, bool) or not isinstance(s, int) or s < 0) for s in shape):
                c.fail(f"{at}.shape", "sizes or 'batch'", shape)
            c.dtype(leaf.get("dtype"), f"{at}.dtype")
            if not isinstance(leaf.get("value"), (str, type(None))):
                c.fail(f"{at}.value", "the name of the value (or null)", leaf.get("value"))
            available.add(leaf.get("value"))
        elif kind != "const" or isinstance(leaf.get("value"), (list, dict)):
            c.fail(at, "a tensor leaf or a constant (a JSON scalar)", leaf)
    for name, path in c.get(program, "parameters", dict, "program").items():
        if not isinstance(path, str) or not all(_IDENTIFIER.fullmatch(p) or p.isdigit() for p in path.split(".")):
            c.fail(f"program.parameters[{name!r}]", "a dotted parameter name", path)
        available.add(name)
    for k, step in enumerate(c.get(program, "steps", list, "program")):
        at = f"program.steps[{k}]"
        inputs, outputs = c.get(step, "inputs", list, at), c.get(step, "outputs", list, at)
        if not all(isinstance(n, str) for n in inputs) or not all(isinstance(n, (str, type(None))) for n in outputs):
            c.fail(at, "inputs and outputs named by strings", inputs + outputs)
        if not set(inputs) <= available:
            c.fail(f"{at}.inputs", "values computed before this step", sorted(set(inputs) - available))
        if "block" in step:
            block = c.get(step, "block", int, at)
            if block not in blocks or len(inputs) != blocks[block]:
                c.fail(f"{at}.block", f"an exported block taking as many tensors as the step gives ({len(inputs)})",
                       block)
        else:
            c.path(root, c.get(step, "graph", str, at), f"{at}.graph")
            for key in ("complex_inputs", "complex_outputs"):
                c.ints(step.get(key, []), f"{at}.{key}", 0, len(inputs if key == "complex_inputs" else outputs) - 1)
            if step.get("lookahead") is not None:
                _lookahead(c, step["lookahead"], f"{at}.lookahead", len(inputs), len(outputs))
        available.update(n for n in outputs if n is not None)
    results = c.get(program, "outputs", dict, "program")
    c.treespec(c.get(results, "spec", str, "program.outputs"), "program.outputs.spec")
    values = c.get(results, "values", list, "program.outputs")
    constants = results.get("constants", {})
    if not isinstance(constants, dict) or len(values) != loaded_treespec(results["spec"]).num_leaves:
        c.fail("program.outputs", "one value per leaf of its spec, and constants by leaf number", results)
    for k, name in enumerate(values):
        if name is None and str(k) not in constants or name is not None and name not in available:
            c.fail(f"program.outputs.values[{k}]", "a computed value (or null with a constant)", name)

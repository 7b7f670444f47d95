"""Imports between the parts of elastic_compile run downward only: the allowed directions are written out below,
and every import of every module (function-level ones included) must follow them."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "elastic_compile"
ROOT = "elastic_compile"  # the package's own __init__: the public API, which imports what it exposes

#: Each part (a subpackage or a top-level module) and the parts it may import. Lower layers first.
ALLOWED = {
    "errors": set(),
    "version": set(),
    "batch": set(),
    "offloading": {"errors"},
    "models": set(),
    "config": {"errors"},
    "capture": {"errors"},
    "state": {"capture", "config", "errors"},
    "analysis": {"batch", "capture", "errors"},
    "sampling": {"errors"},
    "cache": {"batch", "config", "errors", "offloading", "sampling", "state"},
    "nn": {"analysis", "batch", "cache", "capture", "config", "errors", "state"},
    "passes": {"analysis", "config", "errors", "nn", "state"},
    "report": {"errors", "passes", "state"},
    "transform": {"analysis", "capture", "config", "errors", "offloading", "passes", "pretrained", "report",
                  "serialization", "state"},
    "stats": {"errors", "nn", "state"},
    "artifact": {"capture", "errors", "state", "version"},
    "serving": {"cache", "state"},
    "pretrained": {"passes", "state"},
    "serialization": {"analysis", "artifact", "config", "errors", "offloading", "passes", "pretrained", "report",
                      "serving", "state", "version"},
    "train": {"batch", "cache", "config", "errors", "nn", "sampling", "serialization", "state", "stats"},
    "backends": {"artifact", "errors"},
    "export": {"artifact", "backends", "capture", "errors", "serialization", "state"},
    "serve": {"artifact", "backends", "cache", "capture", "errors", "nn", "sampling", "serialization", "state"},
    "deploy": {"export", "serve"},
    "runtime": {"serve"},
    "reference": {"analysis", "errors", "sampling", "state", "stats"},
    ROOT: {"cache", "capture", "config", "deploy", "errors", "report", "runtime", "serialization", "state", "stats",
           "train", "transform", "version"},
    "cli": {ROOT, "artifact", "cache", "config", "errors", "reference", "sampling", "serve", "state", "stats",
            "train", "version"},
}


def part_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ROOT


def modules():
    """``(dotted name, package parts, path)`` of every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [ROOT] + list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        yield ".".join(parts), package, path


def imported(tree: ast.AST, package: list[str]):
    """``(line, module)`` of every elastic_compile module an AST imports, at any depth (function-level too)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == ROOT or name.startswith(ROOT + "."):
                yield node.lineno, name


def import_edges() -> dict[tuple[str, str], list[str]]:
    """``{(importer part, imported part): ["module:line", ...]}`` over the whole package."""
    edges: dict[tuple[str, str], list[str]] = {}
    for name, package, path in modules():
        for line, target in imported(ast.parse(path.read_text()), package):
            edge = (part_of(name), part_of(target))
            if edge[0] != edge[1]:
                edges.setdefault(edge, []).append(f"{name}:{line}")
    return edges


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of a directed graph as a list of nodes, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for following in sorted(graph.get(node, ())):
            if state.get(following) == 1:
                return path[path.index(following):] + [following]
            if following not in state:
                found = visit(following)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_every_part_of_the_package_has_a_place_in_the_allowed_graph():
    parts = {part_of(name) for name, _, _ in modules()}
    assert parts == set(ALLOWED), "add new parts to ALLOWED (and only there decide what they may import)"
    assert all(dependencies <= set(ALLOWED) for dependencies in ALLOWED.values())


def test_the_allowed_graph_has_no_cycle():
    assert cycle(ALLOWED) is None


def test_imports_between_parts_follow_the_allowed_graph():
    wrong = {f"{a} -> {b}": where for (a, b), where in import_edges().items() if b not in ALLOWED[a]}
    assert not wrong, f"imports against the layering: {wrong}"


def test_no_import_cycle_between_parts():
    graph: dict[str, set[str]] = {}
    for a, b in import_edges():
        graph.setdefault(a, set()).add(b)
    assert cycle(graph) is None


def test_only_the_command_line_imports_the_public_api():
    importers = sorted({a for a, b in import_edges() if b == ROOT})
    assert importers == ["cli"]


def _internal(node: ast.AST) -> bool:
    if isinstance(node, ast.ImportFrom):
        return bool(node.level) or (node.module or "").split(".")[0] == ROOT
    return isinstance(node, ast.Import) and any(alias.name.split(".")[0] == ROOT for alias in node.names)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("__init__.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_package_inits_import_their_own_modules_at_the_top(path):
    """No import of the package's own modules placed after code (or inside a function) to dodge a cycle."""
    body = ast.parse(path.read_text()).body
    first_code = next((k for k, node in enumerate(body) if not isinstance(node, (ast.Import, ast.ImportFrom))
                       and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))), len(body))
    late = [node.lineno for statement in body[first_code:] for node in ast.walk(statement) if _internal(node)]
    assert not late, f"imports of elastic_compile modules after code in {path}: lines {late}"


def test_the_cycle_finder_finds_cycles():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None

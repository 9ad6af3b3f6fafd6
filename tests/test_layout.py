"""The package's shape: no import cycle (function-local imports included), the model file stands alone, and no
function longer than 40 lines outside the CLI's parser.

The import graph is read from the source with ``ast``: an edge for every ``import moerge.x`` / ``from .x import``
anywhere in a module (at top level or inside a function, so a local import cannot hide a cycle).  A package's
``__init__`` counts as the module of its own path; importing ``moerge.a.b`` adds an edge to ``moerge.a.b`` only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "moerge"
MAX_LINES = 40
LONG_ALLOWED = {"moerge.cli.parser"}  # the CLI's argument table


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(mod: str, is_pkg: bool, node: ast.ImportFrom, known: dict[str, Path]) -> list[str]:
    base = mod if is_pkg else mod.rsplit(".", 1)[0]
    for _ in range(max(node.level - 1, 0)):
        base = base.rsplit(".", 1)[0]
    target = (f"{base}.{node.module}" if node.module else base) if node.level else (node.module or "")
    subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known]
    if len(subs) == len(node.names):  # `from pkg import submodule`: the package body is not what is used
        return subs
    return subs + ([target] if target in known else [])


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for mod, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                graph[mod].update(_resolve(mod, path.name == "__init__.py", node, known))
            elif isinstance(node, ast.Import):
                graph[mod].update(a.name for a in node.names if a.name in known)
        graph[mod].discard(mod)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_cycle_detector_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_model_imports_nothing_of_moerge() -> None:
    """``moerge.modeling`` is the ground floor: the build side may import it, never the reverse."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("moerge.modeling"):
            assert all(d.startswith("moerge.modeling") for d in deps), (mod, deps)


def test_no_long_functions() -> None:
    long = []
    for mod, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > MAX_LINES and f"{mod}.{node.name}" not in LONG_ALLOWED:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert long == []

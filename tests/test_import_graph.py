"""The import graph: the process that plans and drives a slide never loads torch.

Module-level imports only (imports inside functions run on the workers, when
a task needs them; ``if TYPE_CHECKING`` blocks never run).
"""

from __future__ import annotations

import pytest

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "wsiseg"

#: The driver side: planning, scheduling, output writing, the command line.
TORCH_FREE = [
    "wsiseg.cli", "wsiseg.config", "wsiseg.run", "wsiseg.run.plan", "wsiseg.run.driver", "wsiseg.run.executors",
    "wsiseg.run.slides", "wsiseg.run.cohort", "wsiseg.run.report", "wsiseg.run.worker", "wsiseg.tile_tasks", "wsiseg.tiling",
    "wsiseg.uncertainty", "wsiseg.output", "wsiseg.guard", "wsiseg.slide", "wsiseg.readers", "wsiseg.resample", "wsiseg.cache", "wsiseg.cluster", "wsiseg.bundle",
    "wsiseg.geojson", "wsiseg.calibrate",
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(node: ast.AST, package: str) -> set[str]:
    """The modules (and ``module.name``) an import statement names; empty for other nodes."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if not isinstance(node, ast.ImportFrom):
        return set()
    base = node.module or ""
    if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
    return {base, *(f"{base}.{alias.name}" for alias in node.names)}


def package_of(path: Path) -> str:
    return module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = package_of(path)

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(imported_names(node, package))
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(tree.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """wsiseg module -> the modules its import loads (wsiseg ones resolved to files, others by top name)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in top_level_imports(path):
            if imported.startswith("wsiseg"):
                while imported not in modules and "." in imported:
                    imported = imported.rsplit(".", 1)[0]  # ``from wsiseg.x import name``
                edges.add(imported)
                parent = imported.rsplit(".", 1)[0]
                if parent in modules and parent != imported:
                    edges.add(parent)  # importing a submodule runs its package first
            else:
                edges.add(imported.split(".")[0])
        graph[name] = edges - {name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_driver_modules_do_not_import_torch_at_module_level() -> None:
    graph = import_graph()
    for name in TORCH_FREE:
        assert name in graph, name
        loaded = reachable(graph, name)
        assert not {"torch", "torchvision"} & loaded, f"{name} loads torch through {sorted(loaded)}"


def test_torch_modules_are_where_models_run() -> None:
    """The graph check above is not vacuous: model and inference modules do load torch."""
    graph = import_graph()
    for name in ("wsiseg.inference", "wsiseg.models.base", "wsiseg.evaluate"):
        assert "torch" in reachable(graph, name), name


@pytest.mark.subprocess
def test_importing_the_driver_side_loads_no_torch() -> None:
    code = "import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE) + "print('torch' in sys.modules)\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def every_import(path: Path) -> set[str]:
    """Every wsiseg module ``path`` imports anywhere: at module level, inside functions, for type checking."""
    package = package_of(path)
    found = set().union(*(imported_names(node, package) for node in ast.walk(ast.parse(path.read_text()))))
    return {name for name in found if name.startswith("wsiseg")}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_module_imports_itself_back() -> None:
    """No circles in the import graph, counting imports inside functions and for type checking."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for imported in every_import(path):
            while imported not in modules and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            edges.add(imported)
        graph[name] = edges - {name}
    assert import_cycles(graph) == []
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail

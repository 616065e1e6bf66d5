"""llmopt's import graph has no cycles, and every module imports on its own.

A cycle, even one hidden in a function-local import, means a type or a function lives in the
wrong module (see docs/architecture.md, "Stage boundaries"); a module that imports only after
another was imported first breaks for whoever imports it first.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "llmopt"


def _module_files() -> dict[str, Path]:
    """Every llmopt module's dotted name and file (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = _module_files()


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(body: list[ast.stmt], deferred: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements run when the module is imported (under ``if``, ``try`` and
    class bodies too), and with ``deferred`` those inside functions as well; never the
    ``if TYPE_CHECKING:`` ones, which never run."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif _is_type_checking(node):
            assert isinstance(node, ast.If)
            yield from _imports(node.orelse, deferred)
        elif deferred or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _imports([child], deferred)
                elif isinstance(child, (ast.ExceptHandler, ast.match_case)):
                    yield from _imports(child.body, deferred)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    """The llmopt modules an import statement in ``module`` imports: ``from a.b import c``
    names module ``a.b.c`` where that is a module, else ``a.b``."""
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names if alias.name in MODULES)
        return
    base = node.module or ""
    if node.level:
        package = module.split(".")
        if MODULES[module].name != "__init__.py":
            package = package[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join([*package, *([base] if base else [])])
    for alias in node.names:
        if f"{base}.{alias.name}" in MODULES:
            yield f"{base}.{alias.name}"
        elif base in MODULES:
            yield base


def import_graph(deferred: bool) -> dict[str, set[str]]:
    """Module -> the llmopt modules it imports (at import time, or also ``deferred``)."""
    graph = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {target for node in _imports(tree.body, deferred)
                         for target in _targets(module, node)} - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _describe(graph: dict[str, set[str]], found: list[list[str]]) -> str:
    lines = []
    for component in found:
        members = set(component)
        lines += [f"{a} -> {b}" for a in component for b in sorted(graph[a] & members)]
        lines.append("")
    return "\n".join(lines)


def test_the_graph_sees_imports_at_every_level() -> None:
    """The parser finds module-level, conditional, relative and function-local imports, and
    skips the ``if TYPE_CHECKING:`` ones, so an empty cycle list means something."""
    source = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import llmopt.errors\n"
        "from llmopt.exporter import registry, ExportOptions\n"
        "from . import ops\n"
        "if TYPE_CHECKING:\n    from llmopt.runtime import load\n"
        "try:\n    from llmopt import models\nexcept ImportError:\n    pass\n"
        "def f():\n    from llmopt.package import Package\n")
    module = "llmopt.exporter.decoder"
    now = {t for n in _imports(source.body, False) for t in _targets(module, n)}
    later = {t for n in _imports(source.body, True) for t in _targets(module, n)}
    assert now == {"llmopt.errors", "llmopt.exporter.registry", "llmopt.exporter",
                   "llmopt.exporter.ops", "llmopt.models"}
    assert later == now | {"llmopt.package"}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_at_module_level() -> None:
    graph = import_graph(deferred=False)
    assert len(graph) > 100  # every module was parsed
    found = cycles(graph)
    assert not found, "import cycles among llmopt modules:\n" + _describe(graph, found)


def test_no_import_cycles_through_function_local_imports() -> None:
    """Heavy third-party modules are imported inside functions on purpose; an llmopt module
    imported inside a function must still not close a circle (move the shared code instead)."""
    graph = import_graph(deferred=True)
    found = cycles(graph)
    assert not found, ("import cycles among llmopt modules (through function-local "
                       "imports):\n" + _describe(graph, found))


# One interpreter; before each module, every llmopt module is dropped from sys.modules, so the
# module is imported with none of its siblings preloaded (third-party modules stay cached).
_IMPORT_EACH = """
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "llmopt" or m.startswith("llmopt.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed.append(name + ":\\n" + traceback.format_exc(limit=-3))
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_alone() -> None:
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, *sorted(MODULES)],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
    assert result.returncode == 0, f"modules that fail to import alone:\n{result.stdout}" \
                                   f"{result.stderr[-3000:]}"

"""The package's layering, read from the source with ``ast``: no module imports another's
private (underscore) names, and the module-level imports among himir_rag modules form no cycle.

Imports inside functions are lazy and may point anywhere (that is how optional layers such as
Ray or the adapters are reached); ``if TYPE_CHECKING:`` blocks never run, so neither counts
for cycles. The underscore rule applies to every import, lazy ones included.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import himir_rag

PACKAGE_DIR = Path(himir_rag.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The module an ``ImportFrom`` in ``module`` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(body: list[ast.stmt], *, module_level_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements of ``body``; with ``module_level_only``, those that run on import."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if module_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if module_level_only and isinstance(node, ast.If) and _is_type_checking(node):
            yield from _imports(node.orelse, module_level_only=True)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                yield from _imports([c for c in children if isinstance(c, ast.AST)],
                                    module_level_only=module_level_only)


def _tree(module: str) -> ast.Module:
    return ast.parse(MODULES[module].read_text(encoding="utf-8"), filename=str(MODULES[module]))


def _private_imports(module: str) -> list[str]:
    """``from himir_rag.x import _y`` lines of ``module`` (x another module), as text."""
    found = []
    for node in _imports(_tree(module).body, module_level_only=False):
        if not isinstance(node, ast.ImportFrom):
            continue
        source = _absolute(module, node)
        if source.split(".")[0] != "himir_rag" or source == module:
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{module}:{node.lineno}: from {source} import {alias.name}")
    return found


def _module_level_edges(module: str) -> set[str]:
    """The himir_rag modules ``module`` imports when it is imported (the parent packages every
    import initialises implicitly are left out: they hold no cycle a package's own imports do not)."""
    edges = set()
    for node in _imports(_tree(module).body, module_level_only=True):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            source = _absolute(module, node)
            # ``from pkg import submodule`` needs the submodule, not pkg's __init__ (a package being
            # initialised is already in sys.modules); other names need the module that defines them
            named = [f"{source}.{alias.name}" for alias in node.names]
            targets = [name for name in named if name in MODULES]
            if len(targets) < len(named):
                targets.append(source)
        edges.update(t for t in targets if t in MODULES and t != module)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_the_walk_sees_the_package() -> None:
    assert {"himir_rag.index", "himir_rag.ingest", "himir_rag.distributed", "himir_rag.store.faiss"} <= set(MODULES)
    assert "himir_rag.ingest" in _module_level_edges("himir_rag.index")
    assert "himir_rag.index" not in _module_level_edges("himir_rag.distributed")  # only under TYPE_CHECKING


def test_no_module_imports_another_modules_private_names() -> None:
    found = [line for module in MODULES for line in _private_imports(module)]
    assert found == [], "make these names public (no underscore) where they are defined:\n" + "\n".join(found)


def test_module_level_imports_have_no_cycle() -> None:
    graph = {module: _module_level_edges(module) for module in MODULES}
    assert _cycles(graph) == []


SAMPLE = '''
from typing import TYPE_CHECKING
from himir_rag.b import public
from . import c
from himir_rag import b, VERSION
if TYPE_CHECKING:
    from himir_rag.d import Only
else:
    import himir_rag.e
try:
    from himir_rag.f import _hidden
except ImportError:
    pass
def lazy():
    from himir_rag.g import _late
'''


def test_the_walk_on_a_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a sample module's edges, private imports and a planted cycle."""
    names = ["himir_rag", "himir_rag.a", "himir_rag.b", "himir_rag.c", "himir_rag.d", "himir_rag.e",
             "himir_rag.f", "himir_rag.g"]
    monkeypatch.setitem(globals(), "MODULES", {n: PACKAGE_DIR / f"{n}.py" for n in names})
    monkeypatch.setitem(globals(), "_tree", lambda module: ast.parse(SAMPLE))
    assert _module_level_edges("himir_rag.a") == {"himir_rag", "himir_rag.b", "himir_rag.c", "himir_rag.e",
                                                  "himir_rag.f"}
    assert _private_imports("himir_rag.a") == ["himir_rag.a:11: from himir_rag.f import _hidden",
                                               "himir_rag.a:15: from himir_rag.g import _late"]
    assert _cycles({"x": {"y"}, "y": {"z"}, "z": {"x"}, "w": {"x"}}) == [["x", "y", "z"]]
    assert _cycles({"x": {"y"}, "y": set()}) == []


def _foreign_private_attributes(tree: ast.Module, where: str) -> list[str]:
    """``x._name`` where ``x`` is not ``self`` / ``cls``: another object's private attribute."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
            found.append(f"{where}:{node.lineno}: .{node.attr}")
    return found


def test_benchmarks_use_only_public_api() -> None:
    """bench/ reaches the index (and every other object) through public names only: what a user can do."""
    bench = [module for module in MODULES if module.startswith("himir_rag.bench")]
    assert "himir_rag.bench.scale" in bench
    found = [line for module in bench for line in _foreign_private_attributes(_tree(module), module)]
    assert found == [], "use public API (e.g. HiMIRIndex.from_vectors / search_vectors) instead of:\n" + "\n".join(found)


def test_the_private_attribute_check_can_fail() -> None:
    sample = ast.parse("index._snapshot = s\nself._own = 1\nindex.search_vectors(v)\nx = other._next_id\n")
    assert _foreign_private_attributes(sample, "m") == ["m:1: ._snapshot", "m:4: ._next_id"]

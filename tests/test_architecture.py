"""The import graph of ``app/`` and ``probes/``, read statically: the boundaries hold that
``docs/architecture.md`` draws ("Folders and what each may use").

Every ``import`` in the two packages is read from the source (module level, inside functions and
classes; not under ``if TYPE_CHECKING:``), so an import that a test run never executes counts
too. Checked here: no cycles; ``probes/`` never imports ``app/``; ``app/`` imports no torch or
transformers, neither itself nor through what it imports at module level (the runtime check is
``tests/app/test_system.py::test_importing_the_service_loads_no_torch``); the pure modules import
no torch at all; only ``app/dispatch/`` and ``probes/isolate.py`` start processes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "probes")
HEAVY = frozenset({"torch", "transformers"})
PURE_MODULES = (
    "probes.search",
    "probes.plan",
    "probes.spec",
    "probes.protocol",
    "probes.errors",
    "probes.seeding",
    "probes.step_time",
    "probes.confirmation",
    "probes.timeline",
    "probes.depth",
    "probes.trial_memo",
)
"""Modules the service and the search use: no torch even in a function body."""
PROCESS_MODULES = frozenset(
    {"subprocess", "multiprocessing", "multiprocessing.context", "multiprocessing.process"}
)
"""Importing these means starting processes (``multiprocessing.connection`` only types a pipe)."""


@dataclass(frozen=True)
class Import:
    source: str
    #: the module imported: ``a.b`` for ``from a.b import c`` unless ``a.b.c`` is a module itself
    target: str
    #: inside a function body: runs when called, not when ``source`` is imported
    lazy: bool
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    is_package = modules()[module].name == "__init__.py"
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join([*base, *([node.module] if node.module else [])])


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        yield from (alias.name for alias in node.names)
        return
    base = _absolute(module, node)
    for alias in node.names:
        yield f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules() else base


def _walk(module: str, nodes: Iterable[ast.stmt], *, lazy: bool) -> Iterator[Import]:
    for node in nodes:
        if isinstance(node, ast.If) and _is_type_checking(node):
            yield from _walk(module, node.orelse, lazy=lazy)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield from (Import(module, t, lazy, node.lineno) for t in _targets(module, node))
            continue
        inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            children = getattr(node, field, None)
            if isinstance(children, list):
                statements = [c for c in children if isinstance(c, ast.stmt)]
                for child in children:
                    if isinstance(child, ast.ExceptHandler | ast.match_case):
                        statements += child.body
                yield from _walk(module, statements, lazy=inner)


@cache
def imports() -> tuple[Import, ...]:
    found: list[Import] = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found += _walk(module, tree.body, lazy=False)
    return tuple(found)


def internal(name: str) -> str | None:
    """The module of ours that an import target names (the package for a name inside it)."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


def graph(*, lazy: bool = True) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in modules()}
    for imp in imports():
        target = internal(imp.target)
        if target is not None and target != imp.source and (lazy or not imp.lazy):
            edges[imp.source].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``edges`` as a path that starts and ends at the same node, else ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in edges.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def _where(imp: Import) -> str:
    return f"{modules()[imp.source].relative_to(ROOT)}:{imp.line} imports {imp.target}"


# --- the reader reads what is there --------------------------------------------------------------


def test_the_reader_sees_module_level_lazy_and_type_only_imports() -> None:
    found = {(i.source, i.target, i.lazy) for i in imports()}
    assert ("app.dispatch.child", "probes.protocol", False) in found
    assert ("app.api.probes", "app.services.jobs", False) in found
    assert ("probes.isolate", "probes.worker", True) in found  # inside _child_main
    assert ("probes.worker", "torch", False) in found
    assert ("app.main", "app.api.probes", False) in found  # `from app.api import probes`
    assert ("probes", "probes.engine", True) in found  # in __getattr__; the TYPE_CHECKING copy is not
    assert not any(i.source == "probes" and i.target == "probes.engine" and not i.lazy for i in imports())
    assert sum(len(targets) for targets in graph().values()) > 150


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"a"}}) == ["a", "a"]


# --- the boundaries ------------------------------------------------------------------------------


def test_the_import_graph_has_no_cycles() -> None:
    """Lazy imports count: a cycle broken only by importing inside a function is still a cycle."""
    assert find_cycle(graph()) is None


def test_probes_never_imports_app() -> None:
    bad = [_where(i) for i in imports() if i.source.startswith("probes") and i.target.split(".")[0] == "app"]
    assert bad == []


def test_app_imports_no_torch_or_transformers_itself() -> None:
    bad = [_where(i) for i in imports() if i.source.startswith("app") and i.target.split(".")[0] in HEAVY]
    assert bad == []


@cache
def _module_level_heavy() -> frozenset[str]:
    return frozenset(i.source for i in imports() if not i.lazy and i.target.split(".")[0] in HEAVY)


@pytest.mark.parametrize("module", sorted(m for m in modules() if m.split(".")[0] == "app"))
def test_importing_an_app_module_imports_no_torch(module: str) -> None:
    reached = closure(module, graph(lazy=False))
    assert sorted(reached & _module_level_heavy()) == []


@pytest.mark.parametrize("module", PURE_MODULES)
def test_the_pure_modules_never_import_torch(module: str) -> None:
    reached = closure(module, graph())
    bad = [_where(i) for i in imports() if i.source in reached and i.target.split(".")[0] in HEAVY]
    assert bad == []


def test_only_the_dispatcher_and_isolate_start_processes() -> None:
    starters = {i.source for i in imports() if i.target in PROCESS_MODULES}
    assert starters  # the rule is not vacuous
    assert {m for m in starters if not m.startswith("app.dispatch.") and m != "probes.isolate"} == set()

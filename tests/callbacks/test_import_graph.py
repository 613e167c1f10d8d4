"""The callbacks package has no import cycle at run time (imports under ``if TYPE_CHECKING:`` are not run).

The graph is built from the modules' syntax trees: an edge for every ``import`` / ``from ... import`` that runs when
the module is imported or one of its functions is called (function-level imports count), to the imported module and
to the packages above it (importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__``). Only modules of
``lightning_stability`` are nodes.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_stability

ROOT = Path(lightning_stability.__file__).parent
PACKAGE = "lightning_stability"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """The modules of the package that ``module`` imports at run time (with every package above them)."""
    found: set[str] = set()
    base = module.split(".") if is_package else module.split(".")[:-1]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    out = set()
    for name in found:
        if not name.startswith(PACKAGE):
            continue
        parts = name.split(".")
        out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


def _graph(package_dir: Path) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        if not path.is_relative_to(package_dir):
            continue
        deps = _runtime_imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle among the nodes of ``graph`` (edges leaving it are ignored), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph:
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := dfs(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)) is not None:
            return found
    return None


def test_the_callbacks_package_has_no_runtime_import_cycle():
    graph = _graph(ROOT / "callbacks")
    guard = "lightning_stability.callbacks.guard"
    assert f"{guard}._rollback" in graph[f"{guard}.gradient_guard"]  # the graph sees the guard's own imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_finds_a_cycle_hidden_behind_a_package_init_and_ignores_type_checking_imports():
    source_a = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lightning_stability.x import b\n"
    assert _runtime_imports(ast.parse(source_a), "lightning_stability.x.a", False) == set()
    source_b = "def f():\n    from .sub import c\n"
    deps = _runtime_imports(ast.parse(source_b), "lightning_stability.x.b", False)
    assert {"lightning_stability.x.sub", "lightning_stability.x.sub.c", "lightning_stability.x"} <= deps
    graph = {"p.a": {"p.sub"}, "p.sub": {"p.sub.c"}, "p.sub.c": {"p.a"}}
    assert _cycle(graph) == ["p.a", "p.sub", "p.sub.c", "p.a"]
    assert _cycle({"p.a": {"p.b"}, "p.b": set()}) is None


def test_the_guard_keeps_its_old_import_paths():
    from lightning_stability.callbacks import GradientGuard
    from lightning_stability.callbacks.gradient_guard import GradientGuard as Old
    from lightning_stability.callbacks.guard import GradientGuard as New

    assert GradientGuard is Old is New

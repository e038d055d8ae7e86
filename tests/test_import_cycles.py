"""swa_lib's modules import each other without a cycle, counting imports inside functions too.

An import inside a function can hide a cycle (it runs only after both modules are loaded), so
every `import` / `from ... import` anywhere in a module's syntax tree is an edge here, and so is
the implicit import of every package __init__ on the way to the imported module.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "swa_lib"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every module of `modules` that `path` imports, wherever the import statement sits."""
    name = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package_of(name, path).split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` is an edge to the module pkg.mod; `from mod import name`, to mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` also runs a and a.b; the nearest known module is the edge.
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
            # Importing a.b.c first runs a/__init__ and a/b/__init__: edges too, except to the
            # packages that hold this module (they are already running when it is imported).
            own = {name.rsplit(".", k)[0] for k in range(1, name.count(".") + 1)}
            while "." in target:
                target = target.rpartition(".")[0]
                if target in modules and target not in own and target != name:
                    found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, colours)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 10 and any(graph.values()), "found no modules or no imports: the walk is broken"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("source, expect_cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, True),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, False),
])
def test_find_cycle_on_hand_made_graphs(source, expect_cycle):
    assert (find_cycle(source) is not None) == expect_cycle


def test_a_late_import_inside_a_function_is_an_edge(tmp_path, monkeypatch):
    pkg = tmp_path / PACKAGE
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("def f():\n    from swa_lib.y import g\n    return g\n")
    (pkg / "y.py").write_text("from . import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    graph = import_graph()
    assert graph["swa_lib.x"] == {"swa_lib.y"} and graph["swa_lib.y"] == {"swa_lib.x"}
    assert find_cycle(graph) in (["swa_lib.x", "swa_lib.y", "swa_lib.x"], ["swa_lib.y", "swa_lib.x", "swa_lib.y"])

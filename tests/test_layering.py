"""The import graph of each package is acyclic, lazy imports included: every `import` in a
module (at the top, in a function, anywhere but under `if TYPE_CHECKING:`) is an edge, and a
depth-first search finds no circle. Also the kernel layer's order: references.py imports only
NumPy, the C twins only the references, the dispatch no op module (docs/autograd.md, "Where
the speed lives", draws it)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _under_type_checking(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, package: str) -> set[str]:
    """The modules of the top-level package that the module at `path` imports, as dotted
    names; `package` is the dotted name of the package `path` sits in."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    here = package.split(".")
    found = set()
    for node in ast.walk(tree):
        if _under_type_checking(node, parents):
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[: len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # `from . import x` and `from pkg import x` may name submodules
            names = ([module] if node.module else []) + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] == here[0])
    return found


def import_graph(package: str) -> dict[str, set[str]]:
    """module -> the package's modules it imports (names that are not modules dropped), for
    every module of the package and its subpackages."""
    modules = {}
    for path in (REPO / package).rglob("*.py"):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = (path, ".".join(parts[:-1]))
    return {name: {m for m in imports_of(path, pkg) if m in modules and m != name}
            for name, (path, pkg) in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of imports as [a, b, ..., a], or None. (Iterative depth-first search; the
    package's __init__ is left out: importing a submodule runs it, but that is no edge.)"""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start, children in graph.items():
        if state.get(start):
            continue
        path, stack = [], [(start, iter(sorted(children)))]
        state[start] = 1
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[node] = 2
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph[child]))))
    return None


@pytest.mark.parametrize("package", ["tensorlite", "gpt"])
def test_the_import_graph_has_no_cycle(package):
    graph = import_graph(package)
    # `from . import x` runs the package's __init__ first, which imports its submodules:
    # that is Python's package machinery, not an edge of ours, so the top __init__ is left
    # out (no module imports tensorlite's or gpt's own names back from it).
    graph.pop(package, None)
    graph = {m: deps - {package} for m, deps in graph.items()}
    assert len(graph) > 5
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import numpy\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                 "    from .c import C\n")
    b = tmp_path / "b.py"
    b.write_text("from . import a\n\ndef f():\n    from .a import g\n")
    assert imports_of(a, "pkg") == set()  # the TYPE_CHECKING import does not count
    a.write_text("def f():\n    from .b import g\n")
    graph = {"pkg.a": imports_of(a, "pkg") & {"pkg.b"}, "pkg.b": imports_of(b, "pkg") & {"pkg.a"}}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])


def test_the_kernel_layers_import_only_downwards():
    graph = import_graph("tensorlite")
    below = {  # module -> the tensorlite modules it may import
        "tensorlite.references": set(),
        "tensorlite.kernels_c": {"tensorlite.references"},
        "tensorlite.kernels": {"tensorlite.references", "tensorlite.kernels_c"},
        "tensorlite.autograd": set(),
    }
    for module, allowed in below.items():
        assert graph[module] <= allowed, f"{module} imports {graph[module] - allowed}"
    source = (REPO / "tensorlite" / "references.py").read_text()
    imported = {n.names[0].name if isinstance(n, ast.Import) else n.module
                for n in ast.walk(ast.parse(source)) if isinstance(n, (ast.Import, ast.ImportFrom))}
    assert imported <= {"numpy", "functools", "math", "__future__"}
    numexpr_users = [p.name for p in (REPO / "tensorlite").glob("*.py") if "numexpr" in
                     imports_of_any(p)]
    assert numexpr_users == ["kernels.py"]


def imports_of_any(path: Path) -> set[str]:
    """Every top-level module name `path` imports, from any package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names

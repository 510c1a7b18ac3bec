"""The shape of ``app``'s imports: no circles, and the HTTP layer does not reach into the pipeline's layers.

Every module under ``app/`` is parsed (not imported, so this runs whatever state the code is in).
An import counts wherever it is written: at module level, inside a function, or under
``if TYPE_CHECKING:`` (a circle hidden from the interpreter is still a circle in the design).
``from app.x import y`` imports the module ``app.x.y`` when there is one, else ``app.x``;
relative imports are resolved against the importing module's package. (Importing ``app.x.y``
also runs ``app/x/__init__.py``; that is not counted as an import of ``app.x``, so keep package
``__init__`` files light.)
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from functools import cache
from itertools import pairwise
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"

#: the pipeline's vocabulary, which the HTTP layer may use; every other ``app.pipeline`` module is serving logic
API_MAY_IMPORT = frozenset({"app.pipeline.answer", "app.pipeline.base", "app.pipeline.streaming"})


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root`` by dotted name (a package by its ``__init__.py``)."""
    return {_module_name(root, path): path for path in sorted(root.rglob("*.py"))}


def _known(name: str, modules: Mapping[str, Path]) -> str | None:
    """``name`` when it is one of ``modules``, else its longest prefix that is (None outside them)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path, modules: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """The modules (of ``modules``) that ``module`` imports, each with the line of the import."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):  # every import, module-level or nested in functions and if-blocks
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := _known(alias.name, modules)) is not None:
                    yield target, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                if node.level > 1:
                    package = package[: -(node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # ``from app.x import y``: the submodule app.x.y when there is one, else app.x itself
                if f"{base}.{alias.name}" in modules:
                    yield f"{base}.{alias.name}", node.lineno
                elif (target := _known(base, modules)) is not None:
                    yield target, node.lineno


@cache
def _graph(root: Path = APP) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}; imports of itself are left out."""
    modules = _modules(root)
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges: dict[str, int] = {}
        for target, line in _imports(module, path, modules):
            if target != module:
                edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """Each strongly connected component of more than one module (Tarjan), with a shortest circle through its first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        # iterative, so a deep import chain cannot hit the recursion limit
        work: list[tuple[str, Iterator[str]]] = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, successors = work[-1]
            for succ in successors:
                if succ not in index:
                    index[succ] = low[succ] = len(index)
                    stack.append(succ)
                    on_stack.add(succ)
                    work.append((succ, iter(sorted(graph[succ]))))
                    break
                if succ in on_stack:
                    low[current] = min(low[current], index[succ])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[current])
                if low[current] == index[current]:
                    component: list[str] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == current:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [(_circle(graph, set(component), component[0]), component) for component in sorted(components)]


def _circle(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    """A shortest path from ``start`` back to itself inside ``component`` (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ not in component:
                    continue
                if succ == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if succ not in previous:
                    previous[succ] = node
                    following.append(succ)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component but on no circle")


def _describe(graph: dict[str, dict[str, int]], circle: list[str]) -> str:
    steps = [f"{a} (line {graph[a][b]})" for a, b in pairwise(circle)]
    return " -> ".join([*steps, circle[-1]])


def test_the_parser_sees_every_kind_of_import(tmp_path: Path) -> None:
    """A guard on the test itself, on a made-up package: every kind of import is an edge, and a circle is found."""
    root = tmp_path / "app"
    files = {
        "__init__.py": "",
        "a.py": "from app.b import thing\n",  # a name from a module: that module
        "b.py": "def later():\n    from app.pkg import c\n",  # in a function; a submodule by its package
        "pkg/__init__.py": "from . import c\n",  # relative, a submodule
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import x\n",  # relative, two levels, type checking only
        "pkg/d.py": "import app.pkg.c as cee\nimport os\nfrom .c import y\nfrom . import e\n",  # plain import; outside app; a name; no such module
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = _graph(root)
    assert graph == {
        "app": {},
        "app.a": {"app.b": 1},
        "app.b": {"app.pkg.c": 2},
        "app.pkg": {"app.pkg.c": 1},
        "app.pkg.c": {"app.a": 3},
        "app.pkg.d": {"app.pkg.c": 1, "app.pkg": 4},
    }
    (circle, component), *others = _cycles(graph)
    assert not others
    assert component == ["app.a", "app.b", "app.pkg.c"]
    assert _describe(graph, circle) == "app.a (line 1) -> app.b (line 2) -> app.pkg.c (line 3) -> app.a"


def test_no_import_cycles() -> None:
    graph = _graph()
    cycles = _cycles(graph)
    report = [f"  {_describe(graph, circle)}\n    (modules tangled with it: {', '.join(component)})" for circle, component in cycles]
    assert not cycles, "import cycles in app (one circle per tangle, with the lines that import):\n" + "\n".join(report)


def test_api_imports_only_the_pipeline_vocabulary() -> None:
    """``app/api`` speaks HTTP; it may name the pipeline's types (answers, requests, streaming) but not its layers."""
    graph = _graph()
    violations = [
        f"{module} imports {target} (line {line})"
        for module, edges in sorted(graph.items())
        if module == "app.api" or module.startswith("app.api.")
        for target, line in sorted(edges.items())
        if (target == "app.pipeline" or target.startswith("app.pipeline.")) and target not in API_MAY_IMPORT
    ]
    assert not violations, "app/api reaches into the pipeline's layers:\n" + "\n".join("  " + v for v in violations)

"""The import graph of src/cggr, read from the source (nothing is imported): the kernels are the lowest layer and
never import the op modules, and no import cycle (two modules importing each other, directly or around a loop)
runs through token scoring, the linear cross-entropy op or the kernels.

Imports inside functions count (a lazy import hides a cycle from Python, not from a reader); imports under
``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cggr"


def _module(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names an import statement anywhere in ``tree`` (but under ``if TYPE_CHECKING:``) loads."""
    out: set[str] = set()
    stack = [tree]
    while stack:
        node = stack.pop()
        if _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package that holds this module
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)  # `from package import module`
        stack.extend(ast.iter_child_nodes(node))
    return out


def import_graph() -> dict[str, set[str]]:
    """cggr module -> the cggr modules it imports."""
    graph = {}
    for name, path in MODULES.items():
        names = _imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {n for n in names if n in MODULES and n != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle_and_the_parser_sees_lazy_and_relative_imports():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    src = "import x\nfrom . import y\ndef f():\n    from .z import w\nif TYPE_CHECKING:\n    import hidden\n"
    names = _imported_names(ast.parse(src), "pkg.mod", False)
    assert {"x", "pkg", "pkg.y", "pkg.z", "pkg.z.w"} <= names and "hidden" not in names


def test_kernels_import_only_kernels():
    graph = import_graph()
    kernels = [m for m in graph if m.startswith("cggr.kernels.")]
    assert "cggr.kernels.linear_cross_entropy_fused" in kernels
    for module in kernels:
        outside = sorted(m for m in graph[module] if not m.startswith("cggr.kernels"))
        assert not outside, f"{module} imports {outside}: a kernel must not import the op layer"


#: Token scoring, the linear cross-entropy op and the kernels: no import cycle may pass through these modules.
OP_LAYER = ("cggr.functional", "cggr.scoring", "cggr._dispatch", "cggr.linear_ce", "cggr.kernels")


def test_no_import_cycle_runs_through_the_ops_or_the_kernels():
    graph = import_graph()
    assert "cggr.linear_ce.autograd" in graph and "cggr.kernels._linear_ce_launch" in graph
    split_imports = graph["cggr.kernels.linear_cross_entropy_fused_split"]
    assert "cggr.kernels.linear_cross_entropy_fused" not in split_imports  # what both share has a module of its own
    for cycle in cycles(graph):
        ours = [m for m in cycle if m == "cggr.linear_ce" or m.startswith(OP_LAYER)]
        assert not ours, f"import cycle {cycle} runs through {ours}"


def test_the_package_has_no_import_cycle():
    """Issue 18's bar for the whole package: no two modules of cggr import each other, directly or around a loop
    (type-checking imports aside), so any module can be read and imported from the bottom up."""
    graph = import_graph()
    assert {"cggr.model", "cggr.integrations.checkpoints", "cggr.cli.race.arms", "cggr.cli.report"} <= set(graph)
    assert cycles(graph) == []

"""The package's import structure: imports flow down, and no module imports one that imports it back.

Layers, lowest first: ``algorithms`` (torch only) · ``config``, ``monitor``, ``kernels``, ``csrc`` · ``ops``,
``data``, ``models``, ``distributed`` · ``rollout``, ``evaluate``, ``judge``, ``annotate``, ``chat``, ``memory`` ·
``trainers`` · ``rounds``, ``pipeline``, ``bench`` · ``cli``. Function-level imports count too: a cycle through
a function body is still a cycle a reader has to untangle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGE = REPO / "saferlhf"
ABOVE_TRAINERS = ("saferlhf.trainers", "saferlhf.rounds", "saferlhf.pipeline", "saferlhf.bench", "saferlhf.cli",
                  "saferlhf.__main__")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
                candidates = [f"{base}.{a.name}" for a in node.names] + [base]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c.startswith("saferlhf"):
                    while c and c not in modules:  # the deepest module the name refers to
                        c = c.rpartition(".")[0]
                    if c and c != name:
                        deps.add(c)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph = _imports()
    assert len(graph) > 40
    # Package __init__ files re-export their own submodules; an edge from a package to its children is not a cycle.
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    assert _cycles(graph) == []


def test_no_module_below_the_trainers_imports_them():
    offenders = sorted((m, d) for m, deps in _imports().items() for d in deps
                       if d.startswith("saferlhf.trainers") and not m.startswith(ABOVE_TRAINERS))
    assert offenders == []


def test_the_math_imports_only_torch():
    for path in (PACKAGE / "algorithms").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    assert n.split(".")[0] in ("torch", "__future__", "math", "typing", "collections", "dataclasses",
                                               "saferlhf"), (path.name, n)
                    if n.startswith("saferlhf"):
                        assert n.startswith("saferlhf.algorithms"), (path.name, n)

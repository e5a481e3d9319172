"""The import graph: no cycles inside the package (lazy imports included), the bundle format independent of who
runs it, the runtime independent of the PEFT reader and of HTTP."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "mpt_export"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, anywhere in its body (function-level imports too)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def _reaches(graph, start, goal) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == goal:
                return path + [nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, path + [nxt]))
    return None


def test_no_import_cycles():
    graph = import_graph()
    cycles = []
    for m in graph:
        loop = _reaches(graph, m, m)
        if loop and all(not x.endswith("__init__") for x in loop):
            cycles.append(" -> ".join(loop))
    # a package importing its own submodules lazily (mpt_export/__init__.py's accessors) is not a cycle of logic
    cycles = [c for c in cycles if not c.startswith("mpt_export -> ") and " -> mpt_export -> " not in c]
    assert not cycles, cycles


def test_layers():
    graph = import_graph()
    closure = lambda m: {x for x in graph if x != m and _reaches(graph, m, x)}  # noqa: E731
    runtime = set().union(*(closure(m) | {m} for m in graph if m.startswith("mpt_export.runtime")))
    assert "mpt_export.bundle" not in runtime  # the runtime reads a bundle through its surface, never imports it
    assert "mpt_export.checkpoint" not in runtime  # nor the PEFT reader
    assert not any(x.startswith("mpt_export.serving") for x in runtime)  # nor anything of HTTP
    assert "mpt_export.taskbank" in runtime

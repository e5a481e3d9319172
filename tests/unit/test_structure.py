"""The architecture, checked: one folder per concept, layers that import one way (declared once, below), no import
cycles (lazy imports included), no private name imported across packages, and the size rules (modules <= 350
lines, functions < 80)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "mpt_export"

# Bottom to top: a module may import its own package and anything in a lower layer, never a higher one.
LAYERS = [
    ("version", "errors"),  # facts and the one exception hierarchy
    ("storage",),  # atomic writes, ownership markers, locks
    ("runtime",),  # sessions over any bundle-like object (backends, decode loop, TensorRT profiles/identity)
    ("bundle",),  # the format: reader, manifest, stamps, task bank
    ("source",),  # PEFT adapters, base models, architectures
    ("export",),  # writing artifacts: torch -> ONNX, validation, quantize, task edits, TensorRT engines
    ("engine",),  # continuous batching over a session; no HTTP
    ("serving",),  # http/, ray/, triton/
    ("tools",),  # demo, benches, the tiny-model factory
    ("", "__main__"),  # the facade (mpt_export/__init__.py) and the console entry
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, m: str):
    """(target module or package, imported name or None) for every import of the package in ``path``."""
    pkg = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                yield base, a.name
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None


def import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports, anywhere in its body (function-level imports too)."""
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {m: set() for m in mods}
    for m, path in mods.items():
        for base, name in _imports(path, m):
            t = f"{base}.{name}" if name and f"{base}.{name}" in mods else base  # a submodule, else its package
            if t in mods and t != m:
                graph[m].add(t)
    return graph


def layer_of(module: str) -> str:
    rest = module.split(".")[1:]
    return rest[0] if rest else ""


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


def test_every_package_has_a_layer():
    tops = {layer_of(m) for m in import_graph()}
    assert tops <= set(LEVEL), f"declare a layer for {sorted(tops - set(LEVEL))} in LAYERS"
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "errors.py", "version.py"], loose


def test_layers_import_downward_only():
    graph = import_graph()
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets
              if layer_of(a) != layer_of(b) and LEVEL[layer_of(b)] > LEVEL[layer_of(a)]]
    assert not upward, upward


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


def test_no_private_names_across_packages():
    mods = {_module_name(p): p for p in PKG.rglob("*.py")}
    bad = []
    for m, path in mods.items():
        here = m if path.name == "__init__.py" else m.rsplit(".", 1)[0]
        for base, name in _imports(path, m):
            if not base.startswith("mpt_export") or name is None:
                continue
            there = base if base in mods and mods[base].name == "__init__.py" else base.rsplit(".", 1)[0]
            if name.startswith("_") and not name.startswith("__") and there != here:
                bad.append(f"{m} imports {base}.{name}")
    # the command line (a published folder) and the scripts use the library's public names only
    for folder in ("cli", "scripts"):
        for path in (PKG.parent / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("mpt_export"):
                    bad += [f"{folder}/{path.name} imports {node.module}.{a.name}" for a in node.names
                            if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


def test_the_runtime_needs_no_bundle_reader_peft_or_http():
    graph = import_graph()
    closure = {x for m in graph if m.startswith("mpt_export.runtime") for x in graph if _reaches(graph, m, x)}
    assert not {layer_of(x) for x in closure} - {"errors", "version", "runtime"}, sorted(closure)


def test_sizes():
    long_files, long_funcs = [], []
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 350:
            long_files.append(f"{path.relative_to(PKG)} ({text.count(chr(10))})")
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80:
                long_funcs.append(f"{path.relative_to(PKG)}:{n.name} ({n.end_lineno - n.lineno + 1})")
    assert not long_files and not long_funcs, (long_files, long_funcs)

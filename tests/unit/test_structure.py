"""The architecture, checked: one folder per concept, layers that import one way (declared once, below), no import
cycles (lazy imports included), no private name imported across packages, and the size rules (modules <= 350
lines, functions < 80). The folders over the library — ``cli/`` (installed as ``mpt_export.cli``), ``scripts/``,
``benchmarks/`` — keep the size rules too, use the library's public names only, and the library never imports them."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "mpt_export"
ROOT = PKG.parent
# the folders over the library: each imports it (public names only), it imports none of them
OUTSIDE = {"cli": "mpt_export.cli", "scripts": "scripts", "benchmarks": "benchmarks"}

# Bottom to top: a module may import its own package and anything in a lower layer, never a higher one.
LAYERS = [
    ("version", "errors"),  # facts and the one exception hierarchy
    ("storage",),  # atomic writes, ownership markers, locks
    ("runtime",),  # sessions over any bundle-like object (backends, decode loop, TensorRT profiles/identity)
    ("bundle",),  # the format: reader, manifest, stamps, task bank
    ("source",),  # PEFT adapters, base models, architectures
    ("export",),  # writing artifacts: torch -> ONNX, validation, quantize, task edits, TensorRT engines
    ("scheduler",),  # continuous batching over a session; no HTTP
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
    assert not bad, bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def outside_modules() -> dict[str, Path]:
    """module name -> file for every module of :data:`OUTSIDE` (cli's under the name it is installed as)."""
    mods = {}
    for folder, name in OUTSIDE.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            mods[".".join([name, *(rel[:-1] if rel[-1] == "__init__" else rel)])] = path
    return mods


def outside_problems(mods: dict[str, Path]) -> list[str]:
    """What the folders over the library must not do: import a private module or name of the library (``cli`` may
    import its own ``_common``/``_help``); in ``scripts/`` and ``benchmarks/``, reach a private attribute either."""
    bad = []
    for m, path in mods.items():
        own = "mpt_export.cli" if m.startswith("mpt_export.cli") else None
        where = path.relative_to(ROOT).as_posix()
        for base, name in _imports(path, m):
            if not base.startswith("mpt_export") or (own and base.startswith(own)):
                continue
            if any(_private(part) for part in base.split(".")) or (name is not None and _private(name)):
                bad.append(f"{where} imports {base}{'.' + name if name else ''}")
        if not own:
            bad += [f"{where}:{n.lineno} uses .{n.attr}" for n in ast.walk(ast.parse(path.read_text()))
                    if isinstance(n, ast.Attribute) and _private(n.attr)]
    return bad


def test_cli_scripts_and_benchmarks_use_the_public_api_only():
    mods = outside_modules()
    assert {m.split(".")[0] for m in mods} == {"mpt_export", "scripts", "benchmarks"}
    assert "mpt_export.cli._common" in mods and "benchmarks.fused_graph_study" in mods
    assert outside_problems(mods) == [], outside_problems(mods)


def library_imports_of_outside() -> list[str]:
    """Imports, anywhere in the library (lazy ones included), of a folder over it — but the console entry's
    (``mpt_export/__main__.py`` starts the CLI: ``from mpt_export.cli import main``, nothing else)."""
    tops = tuple(OUTSIDE.values())
    bad = []
    for path in PKG.rglob("*.py"):
        m = _module_name(path)
        for base, name in _imports(path, m):
            if base in tops or base.startswith(tuple(f"{t}." for t in tops)):
                if (m, base, name) != ("mpt_export.__main__", "mpt_export.cli", "main"):
                    bad.append(f"{m} imports {base}{'.' + name if name else ''}")
    return bad


def test_the_library_imports_no_cli_script_or_benchmark():
    assert library_imports_of_outside() == []


def test_the_runtime_needs_no_bundle_reader_peft_or_http():
    graph = import_graph()
    closure = {x for m in graph if m.startswith("mpt_export.runtime") for x in graph if _reaches(graph, m, x)}
    assert not {layer_of(x) for x in closure} - {"errors", "version", "runtime"}, sorted(closure)


def test_sizes():
    """The library and every folder over it (:data:`OUTSIDE`)."""
    long_files, long_funcs = [], []
    paths = [*PKG.rglob("*.py"), *outside_modules().values()]
    assert any(p.parent.name == "cli" for p in paths) and any(p.parent.name == "benchmarks" for p in paths)
    for path in paths:
        text, where = path.read_text(), path.relative_to(ROOT).as_posix()
        if text.count("\n") > 350:
            long_files.append(f"{where} ({text.count(chr(10))})")
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno >= 80:
                long_funcs.append(f"{where}:{n.name} ({n.end_lineno - n.lineno + 1})")
    assert not long_files and not long_funcs, (long_files, long_funcs)


def test_every_package_is_installed():
    """pyproject.toml lists the packages to install by name: a folder renamed or added without it installs a
    broken distribution (an editable install refuses to build), so the list must equal the folders on disk."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {_module_name(p.parent / "__init__.py") for p in PKG.rglob("__init__.py")}
    on_disk |= {OUTSIDE["cli"]}
    assert set(conf["packages"]) == on_disk
    assert conf["package-dir"] == {OUTSIDE["cli"]: "cli"}

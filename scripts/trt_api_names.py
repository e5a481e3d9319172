"""Write mpt_export/runtime/trt/tensorrt_api.json: the names TensorRT's Python bindings define, read from their source.

    python scripts/trt_api_names.py TENSORRT_CHECKOUT COMMIT RELEASE

TENSORRT_CHECKOUT is a git checkout (or bare mirror) of NVIDIA/TensorRT; COMMIT the release commit (e.g. the
"10.16.1 update"); RELEASE its version string. Per Python class or enum of the bindings (``py::class_<...>(scope,
"Name"`` / ``py::enum_<...>(scope, "Name"``): the methods and properties it defines (``.def("x"``, ``.def_property*(
"x"``, ``.def_readwrite("x"``) with the keyword names of each (``"arg"_a``), and the enum values (``.value("X"``).
Module-level data types (``trt.float32``...) come from ``m.attr("x")``. A regex reading, good enough for a guard
test: anything it misses fails the test loudly and is checked by hand.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

FILES = ["python/src/infer/pyCore.cpp", "python/src/infer/pyFoundationalTypes.cpp", "python/src/infer/pyGraph.cpp",
         "python/src/parsers/pyOnnx.cpp", "python/src/pyTensorRT.cpp"]
CLASS = re.compile(r'py::(?:class_|enum_)<[^;]*?>\s*\(\s*\w+\s*,\s*"(\w+)"')
MEMBER = re.compile(r'\.(def|def_property|def_property_readonly|def_readwrite|def_readonly|def_static|value)\(\s*"(\w+)"')
KWARG = re.compile(r'"(\w+)"_a')
ATTR = re.compile(r'm\.attr\(\s*"(\w+)"\s*\)')


def read(repo: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "-C", repo, "show", f"{commit}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def extract(text: str, out: dict, module: set) -> None:
    module.update(ATTR.findall(text))
    events = sorted([(m.start(), "class", m.group(1)) for m in CLASS.finditer(text)]
                    + [(m.start(), "member", m.group(2)) for m in MEMBER.finditer(text)])
    current = None
    starts = [pos for pos, kind, _ in events] + [len(text)]
    for i, (pos, kind, name) in enumerate(events):
        if kind == "class":
            current = out.setdefault(name, {})
            continue
        if current is None:
            continue
        body = text[pos:starts[i + 1]]
        args = current.setdefault(name, [])
        for a in KWARG.findall(body.split(";")[0]):
            if a not in args:
                args.append(a)


def main(repo: str, commit: str, release: str) -> None:
    classes: dict[str, dict[str, list[str]]] = {}
    module: set[str] = set()
    for f in FILES:
        extract(read(repo, commit, f), classes, module)
    data = {"release": release, "commit": commit, "source": FILES,
            "module": sorted(module), "classes": {k: dict(sorted(v.items())) for k, v in sorted(classes.items())}}
    dest = Path(__file__).resolve().parents[1] / "mpt_export" / "runtime" / "trt" / "tensorrt_api.json"
    dest.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"{dest}: {len(classes)} classes, {sum(len(v) for v in classes.values())} members, {len(module)} module names")


if __name__ == "__main__":
    main(*sys.argv[1:4])

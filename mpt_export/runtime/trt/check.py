"""``check-trt``: will TensorRT's ONNX parser accept these graphs? A CPU-only check (runs in CI).

Checked per graph, every problem collected before one error lists them all: every node's domain and op type —
inside ``If``/``Loop``/``Scan`` bodies and model-local functions too — against the operators the TensorRT 10 ONNX
parser imports (``onnx_tensorrt_ops.txt``, taken from onnx-tensorrt's operator table; ONNX Runtime contrib ops —
domain com.microsoft — and ORT's dynamic-int8 ops are not), tensor dtypes (no complex / strings; float64 graph
inputs or outputs are refused, float64 initializers only warned about: the parser casts them down to float32),
external-data files present and complete, and every dynamic axis of every input bounded by the optimization
profiles computed for the limits.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ...errors import MptExportError, TrtCheckError
from .profiles import fit_limits, profiles
from .versions import opset_problem

OPS_FILE = Path(__file__).with_name("onnx_tensorrt_ops.txt")


@lru_cache(maxsize=1)
def _op_table() -> tuple[frozenset, frozenset]:
    """(supported, listed as unsupported) ONNX operator names."""
    supported, unsupported, into = set(), set(), None
    for line in OPS_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line == "unsupported:":
            into = unsupported
            continue
        (into if into is not None else supported).add(line)
    return frozenset(supported), frozenset(unsupported)


def trt_supported_ops() -> frozenset:
    return _op_table()[0]


UNSUPPORTED_HINTS = {
    "DynamicQuantizeLinear": "ORT dynamic int8 (an int8 bundle is for ONNX Runtime on CPUs; build TensorRT from the fp32/fp16 bundle)",
    "MatMulInteger": "ORT dynamic int8 (build TensorRT from the fp32/fp16 bundle)",
    "ConvInteger": "ORT dynamic int8",
    "MatMulNBits": "ONNX Runtime's weight-only int8/int4 contrib op (a --quantize int8/int4 bundle is for ONNX Runtime; "
                   "build TensorRT from the fp32/fp16 bundle)",
}
BAD_DTYPES = {14: "complex64", 15: "complex128", 8: "string"}
FLOAT64 = 11


def _nodes(graph, where: str):
    """(node, where) for every node of ``graph`` and of the subgraphs its nodes carry (If/Loop/Scan bodies)."""
    import onnx

    for n in graph.node:
        yield n, where
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(a.g, f"{where} > {n.op_type} {n.name}.{a.name}")
            elif a.type == onnx.AttributeProto.GRAPHS:
                for k, g in enumerate(a.graphs):
                    yield from _nodes(g, f"{where} > {n.op_type} {n.name}.{a.name}[{k}]")


def _initializers(graph):
    import onnx

    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for g in a.graphs:
                    yield from _initializers(g)
            elif a.type == onnx.AttributeProto.TENSOR and n.op_type == "Constant":
                yield a.t


def check_trt(bundle, limits=None, trt_version: tuple[int, int] | None = None) -> dict:
    """-> summary per graph (with ``warnings``); raises TrtCheckError listing every problem found. ``trt_version``:
    the release the engines are for (its parser's opset range is checked)."""
    import onnx

    limits = limits or fit_limits(bundle.info)
    said = opset_problem(bundle.info.opset, trt_version) if trt_version else None
    problems: list[str] = [said] if said else []
    summary = {}
    supported = trt_supported_ops()
    try:
        profs = profiles(bundle.info, limits)
    except MptExportError as e:
        profs = {}
        problems.append(str(e))
    for graph, spec in bundle.info.graphs.items():
        if graph == "composer":
            continue
        path = bundle.file(spec.file)
        warnings: list[str] = []
        model = onnx.load(str(path), load_external_data=False)
        functions = {(f.domain, f.name): f for f in model.functions}
        ops: dict = {}
        walk = list(_nodes(model.graph, "graph"))
        for f in model.functions:
            walk += list(_nodes(f, f"function {f.domain}.{f.name}"))
        for n, where in walk:
            if (n.domain, n.op_type) in functions:
                continue  # a call of a model-local function: its body is scanned above
            ops.setdefault((n.domain or "ai.onnx", n.op_type), (n.name, where))
        for (domain, op), (node, where) in sorted(ops.items()):
            at = f"node {node}" + ("" if where == "graph" else f" in {where}")
            if domain not in ("ai.onnx", ""):
                problems.append(f"{spec.file}: unsupported op {op} (domain {domain}: an ONNX Runtime contrib op, {at})")
            elif op not in supported:
                hint = UNSUPPORTED_HINTS.get(op, "not in the TensorRT ONNX parser's operator list")
                problems.append(f"{spec.file}: unsupported op {op} ({at}: {hint})")
        for vi in list(model.graph.input) + list(model.graph.output):
            et = vi.type.tensor_type.elem_type
            if et in BAD_DTYPES or et == FLOAT64:
                problems.append(f"{spec.file}: {vi.name} is {BAD_DTYPES.get(et, 'float64')}, which a TensorRT "
                                "engine cannot take or return")
        inits = list(_initializers(model.graph))
        for f in model.functions:
            inits += [a.t for n in f.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        doubles = [t.name or "(constant)" for t in inits if t.data_type == FLOAT64]
        for t in inits:
            if t.data_type in BAD_DTYPES:
                problems.append(f"{spec.file}: initializer {t.name} is {BAD_DTYPES[t.data_type]}")
        if doubles:
            warnings.append(f"{spec.file}: {len(doubles)} float64 initializer(s) ({', '.join(doubles[:3])}"
                            f"{', ...' if len(doubles) > 3 else ''}) — the parser casts them to float32")
        ext = {}
        for t in model.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if info:
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
                ext[info["location"]] = max(ext.get(info["location"], 0), end)
        for loc, end in ext.items():
            f = path.parent / loc
            if not f.is_file():
                problems.append(f"{spec.file}: external data file {loc} is missing")
            elif f.stat().st_size < end:
                problems.append(f"{spec.file}: external data file {loc} is truncated ({f.stat().st_size} < {end} bytes)")
        if graph in profs:
            for vi in model.graph.input:
                for p in profs[graph]:
                    s = p["shapes"].get(vi.name)
                    dims = vi.type.tensor_type.shape.dim
                    if s is None or len(s["max"]) != len(dims):
                        problems.append(f"{spec.file}: input {vi.name} is not bounded by profile {p['name']}")
                        break
        summary[graph] = {"file": spec.file, "nodes": len(walk), "ops": len(ops), "warnings": warnings,
                          "external_data": sorted(ext), "profiles": [p["name"] for p in profs.get(graph, [])]}
    if problems:
        raise TrtCheckError(f"{len(problems)} problem(s) for TensorRT: " + "; ".join(problems), problems)
    return summary

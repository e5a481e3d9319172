"""``check-trt``: will TensorRT's ONNX parser accept these graphs? A CPU-only check (runs in CI).

Checked per graph: every node's domain and op type against what the TensorRT ONNX parser supports for the targeted
versions (ONNX Runtime contrib ops — domain com.microsoft — and ORT's dynamic-int8 ops are not), tensor dtypes
(no float64 / complex / strings), external-data files present and complete, and every dynamic axis of every input
bounded by the optimization profiles computed for the user's limits.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MptExportError
from .profiles import Limits, profiles

# ONNX operators the TensorRT 10/11 ONNX parser imports (onnx-tensorrt's operator support list), restricted to the
# ones transformer exports produce; anything else is reported, not guessed.
TRT_SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Clip Concat
Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp
Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Greater GreaterOrEqual GroupNormalization
HardSigmoid Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
MatMul Max MaxPool Mean Min Mod Mul Neg NonZero Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL2
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize Round ScatterElements ScatterND
Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign Split Sqrt Squeeze Sub Sum Tan Tanh Tile TopK
Transpose Trilu Unsqueeze Where Xor
""".split())
UNSUPPORTED_HINTS = {
    "DynamicQuantizeLinear": "ORT dynamic int8 (an int8 bundle is for ONNX Runtime on CPUs; build TensorRT from the fp32/fp16 bundle)",
    "MatMulInteger": "ORT dynamic int8 (build TensorRT from the fp32/fp16 bundle)",
    "ConvInteger": "ORT dynamic int8",
}
BAD_DTYPES = {11: "float64", 14: "complex64", 15: "complex128", 8: "string"}


class TrtCheckError(MptExportError):
    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


def check_trt(bundle, limits: Limits | None = None) -> dict:
    """-> summary per graph; raises TrtCheckError listing every problem found."""
    import onnx

    limits = limits or Limits()
    problems: list[str] = []
    summary = {}
    try:
        profs = profiles(bundle.manifest, limits)
    except MptExportError as e:
        profs = {}
        problems.append(str(e))
    for graph, spec in bundle.manifest["graphs"].items():
        if graph == "composer":
            continue
        path = bundle.file(spec["file"])
        model = onnx.load(str(path), load_external_data=False)
        ops = {}
        for n in model.graph.node:
            ops.setdefault((n.domain or "ai.onnx", n.op_type), n.name)
        bad_ops = []
        for (domain, op), node in sorted(ops.items()):
            if domain not in ("ai.onnx", ""):
                bad_ops.append(f"{op} (domain {domain}: an ONNX Runtime contrib op, node {node})")
            elif op not in TRT_SUPPORTED_OPS:
                hint = UNSUPPORTED_HINTS.get(op, "not in the TensorRT ONNX parser's operator list")
                bad_ops.append(f"{op} (node {node}: {hint})")
        for b in bad_ops:
            problems.append(f"{spec['file']}: unsupported op {b}")
        for vi in list(model.graph.input) + list(model.graph.output):
            et = vi.type.tensor_type.elem_type
            if et in BAD_DTYPES:
                problems.append(f"{spec['file']}: {vi.name} is {BAD_DTYPES[et]}, which TensorRT does not support")
        for t in model.graph.initializer:
            if t.data_type in BAD_DTYPES:
                problems.append(f"{spec['file']}: initializer {t.name} is {BAD_DTYPES[t.data_type]}")
        ext = {}
        for t in model.graph.initializer:
            info = {e.key: e.value for e in t.external_data}
            if info:
                end = int(info.get("offset", 0)) + int(info.get("length", 0))
                ext[info["location"]] = max(ext.get(info["location"], 0), end)
        for loc, end in ext.items():
            f = path.parent / loc
            if not f.is_file():
                problems.append(f"{spec['file']}: external data file {loc} is missing")
            elif f.stat().st_size < end:
                problems.append(f"{spec['file']}: external data file {loc} is truncated ({f.stat().st_size} < {end} bytes)")
        if graph in profs:
            for vi in model.graph.input:
                for p in profs[graph]:
                    s = p["shapes"].get(vi.name)
                    dims = vi.type.tensor_type.shape.dim
                    if s is None or len(s["max"]) != len(dims):
                        problems.append(f"{spec['file']}: input {vi.name} is not bounded by profile {p['name']}")
                        break
        summary[graph] = {"file": spec["file"], "nodes": len(model.graph.node), "ops": len(ops),
                          "external_data": sorted(ext), "profiles": [p["name"] for p in profs.get(graph, [])]}
    if problems:
        raise TrtCheckError(f"{len(problems)} problem(s) for TensorRT: " + "; ".join(problems), problems)
    return summary

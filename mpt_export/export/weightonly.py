"""Weight-only block quantization of a graph's MatMul weights (``int8``/``int4``): ONNX Runtime's ``MatMulNBits``
contrib op, symmetric blocks along the input dimension (``block_size`` rows of a weight share one scale).
``accuracy_level`` says how the op computes: 4 (the default, as ONNX Runtime GenAI's CPU models) quantizes each
activation row to int8 inside the op and runs integer kernels; 0 keeps activations float. Measured with onnxruntime
1.32 on 2 x86 cores, a 134M Llama at batch 1 (fp32: 48.5 tok/s): int8 at level 4 90 tok/s, at level 0 2.7 tok/s (ONNX
Runtime has no fast float-activation kernel for 8-bit weights on x86: it is for GPUs and ARM); int4 127 vs 54 tok/s.

The quantizer takes a ``MatMul`` whose second input is a 2-D initializer. Two forms the exporter writes for linear
layers are first rewritten into that one, so every projection is quantized:

- ``Gemm(A, B, C)`` with a constant ``B`` (GPT-2's ``Conv1D``, and ``transB=1`` layers): ``MatMul(A, B')`` then
  ``Add(C)``, ``B'`` the constant transposed where ``transB`` says so;
- ``MatMul(A, Transpose(W))`` over an initializer ``W`` (a tied LM head): the transposed copy becomes the initializer
  (it is quantized, so it costs a fraction of the float table it duplicates).

The embedding table (``Gather``) is block-quantized too (:func:`quantize_embeddings`: ONNX Runtime's
``GatherBlockQuantized``, int8 blocks of ``block_size``, each token's row dequantized as it is read): it is read one
row per token, so this is for the bundle's size, not speed or resident memory (ONNX Runtime maps the weights file,
and only the rows read become resident) — a 32k x 768 table is 94 MiB in float, 24 MiB in int8. It is int8 in int4
bundles too: a 4-bit table saved 9 MiB more but moved small models' logits by twice as much (the tests' Gemma 3,
whose scaled embeddings feed every layer). ``quantize --embeddings float`` keeps it float. Only ONNX Runtime runs
``MatMulNBits`` and ``GatherBlockQuantized``; TensorRT's ONNX parser does not know them."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from ..errors import InputError, MissingDependencyError

BITS = {"int8": 8, "int4": 4}
DEFAULT_BLOCK_SIZE = 32
EMBEDDING_BITS = 8  # the embedding table's blocks, int4 bundles too (see the module docstring)
DEFAULT_ACCURACY_LEVEL = 4
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (float activations here), 1 fp32, 2 fp16, 3 bf16, 4 int8


def check_block(block_size: int, accuracy_level: int | None) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 \
            or block_size & (block_size - 1):
        raise InputError(f"--block-size must be a power of two >= 16 (MatMulNBits' blocks), got {block_size!r}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise InputError(f"--accuracy-level must be one of {', '.join(map(str, ACCURACY_LEVELS))} (MatMulNBits: 4 "
                         f"quantizes activations to int8 inside the op), got {accuracy_level!r}")


def _const(inits: dict, name: str):
    import onnx.numpy_helper as nh

    return nh.to_array(inits[name]) if name in inits else None


def linear_as_matmul(graph) -> dict:
    """Rewrite ``graph`` in place so every linear layer with a constant weight is ``MatMul(x, W)`` over a 2-D
    initializer (see the module docstring); -> counts of what was rewritten."""
    import numpy as np
    import onnx
    import onnx.numpy_helper as nh

    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    done = Counter()
    nodes = []
    for n in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        if n.op_type == "Gemm" and len(n.input) >= 2 and n.input[1] in inits and not attrs.get("transA", 0) \
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0:
            w = _const(inits, n.input[1])
            if attrs.get("transB", 0):
                w = np.ascontiguousarray(w.T)
            name = f"{n.input[1]}.matmul_weight"
            graph.initializer.append(nh.from_array(w, name))
            inits[name] = graph.initializer[-1]
            if len(n.input) > 2 and n.input[2]:
                mid = f"{n.output[0]}.matmul"
                nodes.append(onnx.helper.make_node("MatMul", [n.input[0], name], [mid], name=f"{n.name}.MatMul"))
                nodes.append(onnx.helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=f"{n.name}.Add"))
            else:
                nodes.append(onnx.helper.make_node("MatMul", [n.input[0], name], [n.output[0]], name=f"{n.name}.MatMul"))
            done["gemm"] += 1
            continue
        if n.op_type == "MatMul" and n.input[1] in producer and producer[n.input[1]].op_type == "Transpose":
            t = producer[n.input[1]]
            perm = [a.ints for a in t.attribute if a.name == "perm"]
            w = _const(inits, t.input[0])
            if w is not None and w.ndim == 2 and (not perm or list(perm[0]) == [1, 0]):
                name = f"{t.input[0]}.transposed"
                if name not in inits:
                    graph.initializer.append(nh.from_array(np.ascontiguousarray(w.T), name))
                    inits[name] = graph.initializer[-1]
                n.input[1] = name
                done["transposed weight"] += 1
        nodes.append(n)
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return dict(done)


def _drop_unused(graph) -> None:
    """Remove what the rewrite left unread: Transpose nodes of folded weights, and initializers no node reads."""
    outputs = {o.name for o in graph.output}
    while True:
        read = Counter(i for n in graph.node for i in n.input) + Counter(outputs)
        dead = [n for n in graph.node if n.op_type == "Transpose" and all(read[o] == 0 for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input} | outputs
    keep = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def quantize_embeddings(graph, bits: int, block_size: int) -> int:
    """Rewrite ``graph`` in place so each float embedding table read by one ``Gather`` on axis 0 (and nothing else) is
    ``GatherBlockQuantized`` over ``bits``-bit symmetric blocks of ``block_size`` along the hidden axis (uint8 data,
    4-bit values packed low nibble first, zero point 2^(bits-1), one float scale per block); -> tables rewritten."""
    import numpy as np
    import onnx
    import onnx.numpy_helper as nh

    inits = {t.name: t for t in graph.initializer}
    readers = Counter(i for n in graph.node for i in n.input)
    done = 0
    for k, n in enumerate(graph.node):
        axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
        if n.op_type != "Gather" or axis != 0 or n.input[0] not in inits or readers[n.input[0]] != 1:
            continue
        w = nh.to_array(inits[n.input[0]])
        if w.ndim != 2 or w.dtype != np.float32 or w.shape[1] % block_size:
            continue
        V, H = w.shape
        blocks = w.reshape(V, H // block_size, block_size)
        top = 2 ** (bits - 1) - 1  # symmetric: -7..7 (int4), -127..127 (int8)
        scales = np.abs(blocks).max(-1) / top
        scales[scales == 0] = 1.0
        q = (np.clip(np.rint(blocks / scales[..., None]), -top, top) + 2 ** (bits - 1)).astype(np.uint8).reshape(V, H)
        if bits == 4:
            q = q[:, 0::2] | (q[:, 1::2] << 4)
        name = n.input[0]
        graph.initializer.remove(inits[name])
        graph.initializer.extend([nh.from_array(np.ascontiguousarray(q), f"{name}.q{bits}"),
                                  nh.from_array(scales.astype(np.float32), f"{name}.scales")])
        graph.node[k].CopyFrom(onnx.helper.make_node(
            "GatherBlockQuantized", [f"{name}.q{bits}", n.input[1], f"{name}.scales"], list(n.output),
            name=f"{n.name}.quantized", domain="com.microsoft", bits=bits, block_size=block_size, gather_axis=0,
            quantize_axis=1))
        done += 1
    return done


def quantize_graph(src: Path, dst: Path, scheme: str, block_size: int = DEFAULT_BLOCK_SIZE,
                   accuracy_level: int | None = None, embeddings: bool = False) -> dict:
    """Write ``src`` (an fp32 ONNX graph with external data) to ``dst`` (its data in ``dst.name + ".data"``) with
    every MatMul weight in ``BITS[scheme]``-bit blocks (and, with ``embeddings``, its embedding table:
    :func:`quantize_embeddings`); -> what was done (node counts, for the manifest)."""
    try:
        import onnx
        from onnxruntime.quantization import QuantFormat
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError:
        raise MissingDependencyError("weight-only quantization needs onnx and onnxruntime's quantization tools "
                                     "(pip install onnx onnxruntime)") from None
    model = onnx.load(str(src))  # block_size and accuracy_level: checked once, by QuantizeOptions
    rewritten = linear_as_matmul(model.graph)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # the quantizer logs every node at INFO and hints at WARNING
    try:
        q = MatMulNBitsQuantizer(model, bits=BITS[scheme], block_size=block_size, is_symmetric=True,
                                 accuracy_level=accuracy_level, quant_format=QuantFormat.QOperator,
                                 op_types_to_quantize=("MatMul",))
        q.process()
    finally:
        root_logger.setLevel(level)
    out = q.model.model
    ops = Counter(n.op_type for n in out.graph.node)
    weights = {t.name for t in out.graph.initializer}
    left = [n.name for n in out.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    if ops["MatMulNBits"] == 0 or left:
        raise InputError(f"{src.name}: ONNX Runtime's quantizer left {len(left) or 'every'} MatMul weight(s) in float "
                         f"({', '.join(left[:3]) or 'none quantized'}); this onnxruntime cannot write {scheme} "
                         "MatMulNBits — upgrade onnxruntime, or use --quantize int8-dynamic")
    tables = quantize_embeddings(out.graph, EMBEDDING_BITS, block_size) if embeddings else 0
    onnx.save_model(out, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=dst.name + ".data", size_threshold=1024)
    return {"matmulnbits": ops["MatMulNBits"], **({"gatherblockquantized": tables} if tables else {}),
            **{f"rewritten {k}": v for k, v in rewritten.items()}}

"""Quantized bundles for ONNX Runtime. Three schemes (``SCHEMES``):

- ``int8`` / ``int4`` (default ``int8``): weight-only — every MatMul weight in symmetric blocks of ``block_size``
  (32) rows, run by ONNX Runtime's ``MatMulNBits``, by default with its int8 activation kernels (``accuracy_level``
  4, as ONNX Runtime GenAI's CPU models; see :mod:`.weightonly` for why);
- ``int8-dynamic``: ONNX Runtime dynamic quantization (MatMul/Gemm weights int8 per channel, activations quantized
  on the fly at every step; what stays in float is a measured choice, see ``VARIANTS`` and benchmarks/int8_study.py).

A quantized bundle is a new bundle (the original is untouched) with the same graph I/O (activations stay fp32 at the
boundary). Before it is written it is compared with its fp32 source on fresh random inputs for every task:

- logits: max abs / rel diff of the last-position logits;
- greedy-token agreement: the int8 model is stepped along the fp32 model's greedy sequence (teacher forcing) and its
  own top-1 choice compared at every step — the share of equal tokens is the agreement. (Free-running agreement,
  where one early difference changes everything after it, is reported too.)

An agreement below ``min_agreement`` refuses the bundle: nothing is written.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ..storage.atomic import replace_dir, resolve_output
from ..bundle.reader import Bundle, load_bundle
from ..bundle.info import BundleInfo, GraphSpec
from ..bundle.manifest import write_manifest
from ..errors import InputError, MissingDependencyError, ValidationError
from ..runtime.fused import FusedCausalSession
from ..storage.ownership import check_path_text
from .scoring import scoring_graphs
from .seq2seq import share_weights, WEIGHTS_FILE
from .weightonly import check_block, DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, quantize_graph

SCHEMES = {
    "int8": "weight-only int8: MatMul weights in symmetric blocks, ONNX Runtime's MatMulNBits",
    "int4": "weight-only int4: MatMul weights in symmetric blocks, ONNX Runtime's MatMulNBits",
    "int8-dynamic": "ONNX Runtime dynamic quantization: int8 weights per channel, activations quantized every step",
}
DEFAULT_SCHEME = "int8"
EMBEDDINGS = ("quantized", "float")  # int8/int4: the embedding table (see weightonly.quantize_embeddings)
# greedy-token agreement with fp32 (teacher-forced) required unless --min-agreement says otherwise; see the README's
# precision table for the measurements behind each
DEFAULT_MIN_AGREEMENT = {"int8": 0.95, "int4": 0.85, "int8-dynamic": 0.9}


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise InputError(f"unknown --quantize {scheme!r}; choose one of {', '.join(SCHEMES)}")


# What stays in float (see int8_plan). Measured on the GPT-2-small-shaped bench (benchmarks/int8_study.py; agreement
# with fp32 over 32 rows x 32 new tokens, teacher-forced / free-running; latency vs "all"; backbone MiB, fp32 = 475):
#   all 99.0% / 81.0%, 1.00x, 157 MiB;  matmul 99.2% / 89.6%, 1.04x, 270 MiB;
#   matmul-fp32-head 99.3% / 89.2%, 1.31x, 380 MiB;  matmul-fp32-head-ends 99.7% / 93.3%, 1.61x, 421 MiB.
# The embedding table quantized per tensor costs the most agreement for no speed: the default keeps it float.
VARIANTS = {
    "all": "every MatMul/Gemm weight and the embedding table int8 (ONNX Runtime's defaults)",
    "matmul": "MatMul/Gemm weights int8; the embedding table (Gather) float",
    "matmul-fp32-head": "MatMul/Gemm weights int8 except the LM head; the embedding table float",
    "matmul-fp32-head-ends": "as matmul-fp32-head, and the first and last layer's projections float",
}
DEFAULT_VARIANT = "matmul"


def _layer_of(name: str) -> int | None:
    m = re.search(r"\.(?:h|layers|layer|block)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise InputError(f"unknown int8 variant {variant!r}; choose one of {', '.join(VARIANTS)}")


def int8_plan(model_path: Path, variant: str) -> dict:
    """Which nodes of a graph to quantize for ``variant``: -> quantize_dynamic keyword arguments and a summary."""
    import onnx

    check_variant(variant)
    g = onnx.load(str(model_path), load_external_data=False).graph
    inits = {t.name for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    matmuls = [n for n in g.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    head = None
    frontier = [o.name for o in g.output if o.name == "logits"]
    while frontier and head is None:  # walk back from logits through casts/scales to the LM head's matmul
        n = producer.get(frontier.pop())
        if n is None:
            continue
        if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits:
            head = n
        else:
            frontier.extend(n.input)
    layers = [x for x in (_layer_of(n.input[1]) for n in matmuls) if x is not None]
    ends = {min(layers), max(layers)} if layers else set()
    keep = []
    if variant.startswith("matmul-fp32-head") and head is not None:
        keep.append(head)
    if variant == "matmul-fp32-head-ends":
        keep += [n for n in matmuls if _layer_of(n.input[1]) in ends and n is not head]
    # the quantizer first rewrites every Gemm as a MatMul named <name>_MatMul: exclude both names
    exclude = [x for n in keep for x in ((n.name, n.name + "_MatMul") if n.op_type == "Gemm" else (n.name,))]
    op_types = None if variant == "all" else ["MatMul", "Gemm"]
    return {"kwargs": {"nodes_to_exclude": exclude, **({"op_types_to_quantize": op_types} if op_types else {})},
            "float_nodes": len(keep), "lm_head": head.name if head is not None else None}


def quantize_graphs(root: Path, info: BundleInfo, src_root: Path, o: "QuantizeOptions") -> BundleInfo:
    """Quantize the model graphs of the bundle under ``src_root`` (``info``: its typed manifest) into ``root``
    (which holds no copy of them) as ``o`` says; -> the quantized bundle's manifest view, with its ``quantization``
    record."""
    scheme, graphs = o.scheme, dict(info.graphs)
    if scheme == "int8-dynamic":
        quantization = _dynamic_graphs(root, graphs, info.model_graphs, src_root, o.variant)
    else:
        done = {}
        for g in info.model_graphs:
            f = graphs[g].file
            done[g] = quantize_graph(src_root / f, root / f, scheme, o.block_size, o.accuracy_level,
                                     embeddings=o.embeddings == "quantized")
            graphs[g] = replace(graphs[g], external_data=f + ".data")
        quantization = {"weights": scheme, "what": SCHEMES[scheme], "block_size": o.block_size, "symmetric": True,
                        "accuracy_level": o.accuracy_level, "embeddings": o.embeddings, "graphs": done}
    if info.seq2seq:
        share_weights(root, [graphs[g].file for g in info.model_graphs], WEIGHTS_FILE)
        graphs.update({g: replace(graphs[g], external_data=WEIGHTS_FILE) for g in info.model_graphs})
    quantization["scheme"] = scheme
    out = replace(info, graphs=graphs, quantization=quantization)
    return _scoring_graph(root, _fused_graph(root, out, info.fused, src_root, o), o)


def _fused_graph(root: Path, info: BundleInfo, fused, src_root: Path, o: "QuantizeOptions") -> BundleInfo:
    """The fused graph (``fused``: the source bundle's), quantized as the traced one and stored with it (the same
    quantized tensors, shared by content); dropped for ``int8-dynamic`` (its quantized activations are the traced
    graph's own ops)."""
    if fused is None:
        return info
    if o.scheme == "int8-dynamic":
        return replace(info, fused=None, fused_skipped="int8-dynamic quantizes the traced graph's activations; the "
                                                       "fused graph is for fp32/fp16 and weight-only int8/int4")

    info.quantization["graphs"][FusedCausalSession.GRAPH] = quantize_graph(
        src_root / fused.file, root / fused.file, o.scheme, o.block_size, o.accuracy_level,
        embeddings=o.embeddings == "quantized")
    plain = info.graphs["backbone"]
    share_weights(root, [plain.file, fused.file], plain.external_data)
    return replace(info, fused=replace(fused, external_data=plain.external_data))


def _scoring_graph(root: Path, info: BundleInfo, o: "QuantizeOptions") -> BundleInfo:
    """The scoring graph, derived again from the quantized backbone (its LM head is the quantized one); none for
    int8-dynamic (its head chain is the dynamic quantization's ops)."""
    if info.scoring is None:
        return info
    if o.scheme == "int8-dynamic":
        return replace(info, scoring=None)

    made = scoring_graphs(root, {"backbone": info.graphs["backbone"].to_dict()}, info.base_model)
    return replace(info, scoring=GraphSpec.of(made["scoring_graphs"]["backbone"]))


def _dynamic_graphs(root: Path, graphs: dict, model_graphs, src_root: Path, variant: str) -> dict:
    """int8 dynamic quantization of ``model_graphs`` (their ``graphs`` entries updated) -> the quantization record."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise MissingDependencyError("int8 quantization needs onnxruntime's quantization tools (pip install onnx onnxruntime)") from None

    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.setLevel(logging.ERROR)  # the quantizer logs a pre-processing hint at WARNING on the root logger
    kept = {}
    try:
        for g in model_graphs:
            f = graphs[g].file
            plan = int8_plan(src_root / f, variant)
            kept[g] = plan["float_nodes"]
            # the quantizer names its data file after its output: <file>.data, the bundle's own convention
            quantize_dynamic(str(src_root / f), str(root / f), weight_type=QuantType.QInt8, per_channel=True,
                             use_external_data_format=True, extra_options={"MatMulConstBOnly": True}, **plan["kwargs"])
            graphs[g] = replace(graphs[g], external_data=f + ".data")
    finally:
        root_logger.setLevel(level)
    return {"weights": "int8", "variant": variant, "what": VARIANTS[variant], "float_matmuls": kept,
            "method": "onnxruntime dynamic quantization, per channel"}


def agreement(ref_session, q_session, tasks: list[str], vocab: int, seed: int = 0, new_tokens: int = 16,
              rows_per_task: int = 2) -> dict:
    """Logits error and greedy-token agreement of ``q_session`` against ``ref_session`` (see module docstring), on
    random ids."""
    rng = np.random.default_rng(seed)
    names = [t for t in tasks for _ in range(rows_per_task)]
    ids = rng.integers(2, vocab, (len(names), 12), dtype=np.int64)
    return {**_agreement(ref_session, q_session, ids, None, names, new_tokens), "seed": seed}


def prompt_agreement(ref_session, q_session, prompts: list[tuple[list[int], str]], new_tokens: int = 16) -> dict:
    """:func:`agreement` on the user's own prompts (``quantize --eval-data``), left-padded into one batch (each row
    gets what it gets alone)."""
    S = max(len(p) for p, _ in prompts)
    ids = np.zeros((len(prompts), S), np.int64)
    mask = np.zeros_like(ids)
    for b, (p, _) in enumerate(prompts):
        ids[b, S - len(p):], mask[b, S - len(p):] = p, 1
    rep = _agreement(ref_session, q_session, ids, mask, [t for _, t in prompts], new_tokens)
    return {**rep, "on": f"{len(prompts)} eval-data prompts"}


def _agreement(ref_session, q_session, ids, mask, names: list[str], new_tokens: int) -> dict:
    l_ref, l_q = ref_session.logits(ids, names, mask), q_session.logits(ids, names, mask)
    d = float(np.abs(l_ref - l_q).max())
    kw = dict(max_new_tokens=new_tokens, eos_token_id=None)
    ref = ref_session.generate_ids(ids, names, mask, **kw)
    forced = q_session.generate_ids(ids, names, mask, forced_tokens=ref, **kw)
    free = q_session.generate_ids(ids, names, mask, **kw)
    return {"logits_max_abs": d, "logits_max_rel": d / float(np.abs(l_ref).max()),
            "greedy_agreement": float((forced == ref).mean()), "free_running_agreement": float((free == ref).mean()),
            "tokens_compared": int(ref.size)}


@dataclass(frozen=True)
class QuantizeOptions:
    """What a quantization is told, checked once (the CLI's --quantize/--block-size/--accuracy-level/--variant/
    --min-agreement); unset fields take the scheme's defaults here."""

    scheme: str = DEFAULT_SCHEME
    block_size: int | None = None  # weight-only: rows per scale (default 32)
    accuracy_level: int | None = None  # weight-only: MatMulNBits' accuracy_level (default 4: int8 activations)
    variant: str | None = None  # int8-dynamic: what stays float (default "matmul")
    embeddings: str | None = None  # int8/int4: the embedding table "quantized" (default) or "float"
    min_agreement: float | None = None  # default: the scheme's DEFAULT_MIN_AGREEMENT

    def __post_init__(self):
        check_scheme(self.scheme)
        if self.scheme == "int8-dynamic":
            if self.block_size is not None or self.accuracy_level is not None or self.embeddings is not None:
                raise InputError("--block-size, --accuracy-level and --embeddings are for the weight-only schemes "
                                 "(int8, int4); int8-dynamic quantizes per channel")
            object.__setattr__(self, "variant", DEFAULT_VARIANT if self.variant is None else self.variant)
            check_variant(self.variant)
        else:
            if self.variant is not None:
                raise InputError(f"--variant chooses what int8-dynamic leaves in float; {self.scheme} quantizes "
                                 "every MatMul weight (and the embedding table unless --embeddings float)")
            if self.embeddings is None:
                object.__setattr__(self, "embeddings", "quantized")
            if self.embeddings not in EMBEDDINGS:
                raise InputError(f"unknown --embeddings {self.embeddings!r}; choose one of {', '.join(EMBEDDINGS)}")

            object.__setattr__(self, "block_size", DEFAULT_BLOCK_SIZE if self.block_size is None else self.block_size)
            if self.accuracy_level is None:
                object.__setattr__(self, "accuracy_level", DEFAULT_ACCURACY_LEVEL)
            check_block(self.block_size, self.accuracy_level)
        if self.min_agreement is None:
            object.__setattr__(self, "min_agreement", DEFAULT_MIN_AGREEMENT[self.scheme])
        if not 0 <= self.min_agreement <= 1:
            raise InputError(f"--min-agreement must be in [0, 1], got {self.min_agreement}")


def quantize_bundle(src: str | Path, out: str | Path, options: QuantizeOptions | None = None, force: bool = False,
                    seed: int = 0, on_step=None, inputs=(), eval_prompts: list | None = None, **fields) -> Bundle:
    """Write a quantized copy (``options``, or its fields as keywords: ``scheme`` int8, int4 or int8-dynamic, ...)
    of the fp32 bundle ``src`` to ``out`` after checking its agreement with ``src`` (``src`` is never modified;
    ``out`` must not be ``src`` or hold it). ``eval_prompts`` [(ids, task)]: judge the agreement on these prompts
    (the user's data) instead of random ids."""
    step = on_step or (lambda s: None)
    o = replace(options, **fields) if options is not None else QuantizeOptions(**fields)
    scheme, min_agreement = o.scheme, o.min_agreement

    check_path_text(Path(out))  # before hashing the source: a bad output path costs nothing
    out = resolve_output(out)
    inputs = [("source bundle", Path(src)), *inputs]
    with load_bundle(src) as b:
        if b.info.dtype != "float32" or b.info.quantization:
            raise InputError(f"{src} is a {(b.info.quantization or {}).get('weights') or b.info.dtype} bundle; "
                             f"{scheme} quantization starts from an fp32 bundle")
        with replace_dir(out, "bundle", force, inputs) as tmp:
            step(f"quantize graphs ({scheme})")
            graph_files = b.info.model_files
            for rel in b.info.files:
                if rel not in graph_files:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(b.file(rel), tmp / rel)
            q_info = quantize_graphs(tmp, b.info, b.root, o)
            record = q_info.quantization
            record.update({"source_bundle": str(b.path), "min_agreement": min_agreement,
                           "source_manifest_sha256": b.info.digest})
            manifest = write_manifest(tmp, q_info.to_manifest())
            step("compare with the fp32 bundle")
            q = Bundle(tmp, manifest)
            rep = prompt_agreement(b.session(), q.session(), eval_prompts) if eval_prompts else \
                agreement(b.session(), q.session(), b.tasks, b.info.base_model.vocab_size, seed=seed)
            manifest = {**manifest, "quantization": {**record, "report": rep}}
            if rep["greedy_agreement"] < min_agreement:
                raise ValidationError(
                    f"{scheme} greedy-token agreement with fp32 is {rep['greedy_agreement']:.1%} over "
                    f"{rep['tokens_compared']} tokens (free-running {rep['free_running_agreement']:.1%}), below the "
                    f"required {min_agreement:.1%} (logits max abs diff {rep['logits_max_abs']:.3g}); keep the fp32 "
                    "bundle or lower --min-agreement if that is acceptable", report=rep)
            manifest = write_manifest(tmp, manifest, known=dict(q.info.files))
    return load_bundle(out, verify=False)


"""``mpt-export bench-export --shape NAME``: export real model sizes on this machine and measure memory and time.

A random-weight model of a real shape (created straight in the target dtype: no fp32 copy of a half model) with a
100-virtual-token, 2-task MPT adapter is built once under the workdir, exported with validation by the real CLI in
a child process (its peak resident memory: the largest ``VmHWM`` of it and the export's own child, sampled), and
then opened and run: ``load_bundle`` + ``session()`` cold and warm, and ``session.generate`` on 8 prompts
x 64 tokens, 8 new tokens — each in a fresh process so every figure is its own peak.

Where a shape cannot be validated on this machine (ONNX Runtime's CPU provider keeps fp16 MatMul weights as fp32,
so a 7B fp16 session needs ~27 GB), the full-size model is exported without validation and the validation runs, in
the same bench, on a model of the same shape cut to 4 layers (same code path, real layer sizes); the output says so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import InputError


from .shapes import SHAPES, Shape  # noqa: F401 (the bench's shapes, re-exported)
from ..export.precision import canonical_dtype
from ..runtime.memory import tree_peak_bytes
from ..storage.ownership import claim_workdir, remove_workdir, seal_workdir
from .demo import make_source_adapter
from .tinytext import make_tokenizer

SHALLOW_LAYERS = 4


def build_model(shape: Shape, out: Path, dtype: str, layers: int | None = None, seed: int = 0) -> int:
    """Save a random-weight model of ``shape`` in ``dtype`` (weights created in that dtype, filled in place) plus
    a tokenizer and a 2-task, 100-virtual-token MPT adapter. -> weight bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    tdtype = getattr(torch, canonical_dtype(dtype))
    layers = layers or shape.layers
    make_tokenizer(out / "base", seq2seq=shape.family == "t5")
    if shape.family == "t5":
        cfg = T5Config(vocab_size=shape.vocab, d_model=shape.hidden, d_kv=shape.hidden // shape.heads, d_ff=shape.ffn,
                       num_layers=layers, num_decoder_layers=layers, num_heads=shape.heads,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0,
                       pad_token_id=0, eos_token_id=1, n_positions=shape.max_positions)
        cls = T5ForConditionalGeneration
    elif shape.family == "llama":
        cfg = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                          num_hidden_layers=layers, num_attention_heads=shape.heads,
                          num_key_value_heads=shape.kv_heads, max_position_embeddings=shape.max_positions,
                          bos_token_id=0, eos_token_id=0)
        cls = LlamaForCausalLM
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        extra = dict(shape.extra)
        if "sliding_window_pattern" in extra:  # Gemma 3: every Nth layer global
            n = extra.pop("sliding_window_pattern")
            extra["layer_types"] = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(layers)]
        cfg = AutoConfig.for_model(shape.family, vocab_size=shape.vocab, hidden_size=shape.hidden,
                                   intermediate_size=shape.ffn, num_hidden_layers=layers,
                                   num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                                   max_position_embeddings=shape.max_positions, bos_token_id=0, eos_token_id=0, **extra)
        cls = AutoModelForCausalLM.from_config
    default = torch.get_default_dtype()
    torch.set_default_dtype(tdtype)  # parameters are created in the target dtype (a 7B fp32 copy would not fit)
    try:
        with torch.device("meta"):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device="cpu")  # storage only, no values to copy
    model.tie_weights()  # to_empty gives tied parameters (T5's shared / encoder / decoder embeddings) storage each
    # Each architecture's own initialisation, as ``from_config`` gives it: T5's scales q by (d_model * d_kv)**-0.5
    # because its attention has no 1/sqrt(d) — one std for every matrix would make its attention ~7x sharper than
    # the model was designed for (near one-hot softmax), and such a network amplifies rounding layer after layer.
    torch.manual_seed(seed)
    with torch.no_grad():
        model.apply(model._init_weights)
    model.config.dtype = tdtype
    model.save_pretrained(str(out / "base"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    make_source_adapter(model, out / "adapter", num_tasks=2, num_virtual_tokens=100, num_ranks=1, seed=seed + 1,
                        task_type="SEQ_2_SEQ_LM" if shape.family == "t5" else "CAUSAL_LM",
                        num_transformer_submodules=1 if shape.family == "t5" else None)
    del model
    return weights


PLANTED_FACTOR = {"float32": 1.01, "float16": 1.10, "bfloat16": 1.10}  # as the validation tests plant them


def mid_value_projection(model):
    """The value projection of the mid-depth attention layer (the decoder's for T5, GPT-2's fused c_attn): where a
    planted error goes."""
    if hasattr(model, "decoder") and hasattr(model.decoder, "block"):
        blocks = model.decoder.block
        return blocks[len(blocks) // 2].layer[0].SelfAttention.v.weight
    if hasattr(model, "transformer") and hasattr(model.transformer, "h"):
        blocks = model.transformer.h
        return blocks[len(blocks) // 2].attn.c_attn.weight
    blocks = model.model.layers
    attn = blocks[len(blocks) // 2].self_attn
    return attn.v_proj.weight if hasattr(attn, "v_proj") else attn.qkv_proj.weight  # Phi-3: the packed projection


_PLANT = """
import json, shutil
from pathlib import Path
import torch
from mpt_export.tools.bench_export import mid_value_projection
from mpt_export.errors import ValidationError
from mpt_export.export.api import verify_bundle
from mpt_export.export.torchside import load_base_model
base, out = Path({base!r}), Path({out!r})
model, _, _ = load_base_model(base, dtype={dtype!r})
with torch.no_grad():
    mid_value_projection(model).mul_({factor!r})
model.save_pretrained(str(out))
del model
for f in base.iterdir():
    if f.is_file() and not (out / f.name).exists():
        shutil.copy2(f, out / f.name)
try:
    verify_bundle({bundle!r}, base_model=out, seed=0)
    print(json.dumps({{"caught": False}}))
except ValidationError as e:
    cases = e.report["cases"]
    print(json.dumps({{"caught": True, "rtol": e.report["rtol"], "failed_outputs": sum(len(c["failed"]) for c in cases),
                      "worst_rel": max(max(c["logits_max_rel"], c["kv_max_rel"]) for c in cases)}}))
"""


def planted_check(base: Path, bundle: Path, out: Path, dtype: str) -> dict:
    """``verify`` the bundle against a copy of its base model with one weight matrix (the mid-depth value
    projection) scaled by ``PLANTED_FACTOR``: the check must fail, and by how much tells the margin."""
    factor = PLANTED_FACTOR[dtype]
    r = _child_rss(_PLANT.format(base=str(base), out=str(out), dtype=dtype, factor=factor, bundle=str(bundle)))
    return {"factor": factor, **r}


def build_model_isolated(shape: Shape, out: Path, dtype: str, layers: int | None = None) -> int:
    """``build_model`` in a child process, so this one never holds a model (a 7B model here and another in the
    export would not fit)."""
    code = (f"import json; from pathlib import Path; from mpt_export.tools.bench_export import Shape, build_model; "
            f"print(json.dumps(build_model(Shape(**{asdict(shape)!r}), Path({str(out)!r}), {dtype!r}, {layers!r})))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        raise InputError(f"building the {shape.family} model failed: {(res.stderr or res.stdout).strip()[-400:]}")
    return int(res.stdout.strip().splitlines()[-1])


def _run_measured(args: list[str], timeout: float = 7200) -> tuple[int, float, int, str]:
    """Run a command; -> (exit code, wall s, peak RSS bytes: the largest ``VmHWM`` of it or any process below it,
    sampled every 0.1 s, output tail). Not ``wait4``'s ``ru_maxrss``: Linux carries that across exec, so the
    command would report the peak of the process that started it (a test runner with models loaded)."""
    with tempfile.TemporaryFile() as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        peak = 0
        while True:
            peak = max(peak, tree_peak_bytes(proc.pid))  # before the wait: a zombie's status has no VmHWM
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        tail = log.read()[-2000:].decode(errors="replace")
    return proc.returncode, wall, peak, tail


def _drop_caches() -> bool:
    """Drop the page cache for a cold start (needs root); -> whether it was done."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _child_rss(code: str, timeout: float = 3600) -> dict:
    """Run ``code`` in a fresh interpreter (so its memory figures are its own); -> the JSON line it printed last,
    or {"error": ...}."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        return {"error": (res.stderr or res.stdout).strip().splitlines()[-1][:300] if (res.stderr or res.stdout) else
                f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


_OPEN = """
import json, time, sys
from mpt_export.runtime.memory import peak_rss_mib
t0 = time.perf_counter()
import mpt_export
b = mpt_export.load_bundle({bundle!r})
t1 = time.perf_counter()
s = b.session(prepack={prepack!r})
t2 = time.perf_counter()
out = {{"open_s": t1 - t0, "session_s": t2 - t1, "prepacked": s.prepacked,
        "peak_rss": int(peak_rss_mib() * 2**20)}}
if {generate!r}:
    import numpy as np
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, (8, 64))
    names = [b.tasks[i % len(b.tasks)] for i in range(8)]
    s.generate_ids(ids, names, max_new_tokens=1, eos_token_id=None)  # warm-up
    t3 = time.perf_counter()
    r = s.generate_detailed(ids, names, max_new_tokens=8, eos_token_id=None)
    out["generate_s"] = time.perf_counter() - t3
    out["tokens_per_s"] = float(r.lengths.sum()) / out["generate_s"]
    out["peak_rss"] = int(peak_rss_mib() * 2**20)
print(json.dumps(out))
"""


def _export(base: Path, adapter: Path, out: Path, dtype: str, validate: bool, provider: str) -> dict:
    exe = str(Path(sys.executable).with_name("mpt-export"))
    args = [exe, "export", "--base-model", str(base), "--adapter", f"task0,task1={adapter}", "--out", str(out),
            "--dtype", dtype, "--seed", "0"]
    if not validate:
        args.append("--no-validate")
    if provider != "cpu":
        args += ["--provider", provider]
    code, wall, peak, tail = _run_measured(args)
    if code != 0:
        raise InputError(f"the export failed (exit {code}): {tail.strip()[-600:]}")
    man = json.loads((out / "manifest.json").read_text())
    return {"wall_s": wall, "peak_rss": peak, "timings": man.get("timings", {}), "validation": man.get("validation"),
            "bundle_bytes": sum(f.stat().st_size for f in out.rglob("*") if f.is_file())}


def _gpu_provider() -> str | None:
    try:
        import onnxruntime as ort

        return "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() else None
    except ImportError:
        return None


def check_shape(shape_name: str, dtype: str | None):
    """-> (the shape, its export dtype), or one InputError naming the choices."""
    if shape_name not in SHAPES:
        raise InputError(f"unknown --shape {shape_name!r}; choose one of: {', '.join(SHAPES)}")
    shape = SHAPES[shape_name]
    return shape, canonical_dtype(dtype or shape.dtype)


def run_bench_export(shape_name: str, dtype: str | None = None, workdir: str | Path = "build/bench-export",
                     keep: bool = False, on_step=None) -> dict:
    step = on_step or (lambda s: None)
    shape, dtype = check_shape(shape_name, dtype)
    short = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[dtype]
    workdir = Path(workdir)
    root = workdir / f"{shape_name}-{short}"
    stamp = root / "shape.json"
    want = {**asdict(shape), "dtype": dtype}
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want):
        remove_workdir(root, "bench-export-workdir")
        claim_workdir(root, "bench-export-workdir", contents=["base", "adapter", "bundle", "shallow", "shape.json"])
        step(f"build a random-weight {shape_name} model in {short} (once)")
        t0 = time.perf_counter()
        weights = build_model_isolated(shape, root, dtype)
        want["weight_bytes"] = weights
        want["build_s"] = round(time.perf_counter() - t0, 1)
        stamp.write_text(json.dumps(want))
        seal_workdir(root)
    meta = json.loads(stamp.read_text())
    weights = meta["weight_bytes"]
    gpu = _gpu_provider()
    full_validate = shape.validate_full or gpu is not None
    result = {"shape": shape_name, "dtype": dtype, "weight_bytes": weights, "params": weights // (4 if short == "fp32"
              else 2), "build_s": meta.get("build_s")}
    bundle = root / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    step(f"export {shape_name} ({weights / 2**30:.1f} GiB of {short} weights)"
         + (" with validation" if full_validate else " (validation on a 4-layer copy next)"))
    ex = _export(root / "base", root / "adapter", bundle, short, full_validate,
                 "cpu" if shape.validate_full or gpu is None else gpu)
    result["export"] = ex
    result["export"]["ratio"] = ex["peak_rss"] / weights
    # A copy of the shape cut to a few layers (real layer sizes): it stands in for validation where the full model
    # cannot be validated here, and for every shape it takes the planted-error check (a second full-size model
    # would not fit the disk beside the first).
    shallow = root / "shallow"
    if shallow.exists():
        shutil.rmtree(shallow)
    shallow.mkdir()
    step(f"the same shape cut to {SHALLOW_LAYERS} layers: export with validation"
         + ("" if full_validate else f" (this machine cannot hold a full {shape_name} {short} session)"))
    sw = build_model_isolated(shape, shallow, dtype, layers=SHALLOW_LAYERS)
    sx = _export(shallow / "base", shallow / "adapter", shallow / "bundle", short, True, "cpu")
    result["shallow"] = {"layers": SHALLOW_LAYERS, "weight_bytes": sw, **sx, "ratio": sx["peak_rss"] / sw,
                         "stands_in_for_validation": not full_validate}
    step(f"planted error: verify the {SHALLOW_LAYERS}-layer bundle against its base with the mid-depth value "
         f"projection x{PLANTED_FACTOR[dtype]}")
    result["planted"] = planted_check(shallow / "base", shallow / "bundle", shallow / "planted", dtype)
    shutil.rmtree(shallow)
    runnable = shape.validate_full or dtype == "float32"
    if runnable:
        step("open + session: cold (page cache dropped) and warm; warm with weights prepacked")
        cold = _drop_caches()
        c = _child_rss(_OPEN.format(bundle=str(bundle), generate=False, prepack="auto"))
        w = _child_rss(_OPEN.format(bundle=str(bundle), generate=False, prepack="auto"))
        wp = _child_rss(_OPEN.format(bundle=str(bundle), generate=False, prepack=True))
        result["startup"] = {"cold": c if cold else None, "warm": w, "warm_prepacked": wp, "cold_dropped_cache": cold}
        step("generate: 8 prompts x 64 tokens, 8 new tokens (default, then prepacked)")
        result["generate"] = _child_rss(_OPEN.format(bundle=str(bundle), generate=True, prepack="auto"))
        result["generate_prepacked"] = _child_rss(_OPEN.format(bundle=str(bundle), generate=True, prepack=True))
    else:
        result["generate"] = {"skipped": f"an fp16 session of this size does not fit ONNX Runtime's CPU provider here "
                                         f"(it keeps MatMul weights as fp32: ~{2 * weights / 2**30:.0f} GiB)"}
    if not keep:
        remove_workdir(root, "bench-export-workdir")
    return result

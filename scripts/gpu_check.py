"""GPU check for mpt-export: report what the machine has, then run what it can.

1. Environment: Python, torch/CUDA/GPU, onnxruntime and its providers, tensorrt.
2. Demo bundle built in code here (exports with this machine's torch/transformers — a compatibility check too).
3. TensorRT importable: build engines for the demo bundle, compare with ONNX Runtime (max abs diff per output on the
   validation inputs) and time generation; a batch whose rows hit EOS at different steps (rows leave the batch:
   the KV gather) must give ONNX Runtime's tokens; a version-compatible build loaded back; a second build reusing
   the first one's timing cache; a T5 bundle built and compared; the `build --print-trtexec` commands executed by
   trtexec when it is on PATH, then `build --adopt` on their plans and generation on them. Otherwise: each says skipped — which proves nothing about those paths.
4. ORT CUDA provider present: the same comparison through it. Otherwise: say so.
5. PyTorch CUDA baseline: PEFT eager on the GPT-2-small-shaped bench workload (8 x 64 tokens, 100 virtual tokens,
   8 new tokens) in fp32 and fp16, next to this runtime on the CPU (ORT, prompt KV cache) on the same machine.
Each step reports its own failure and the script goes on; results go to OUT/gpu_check.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "build")
OUT.mkdir(parents=True, exist_ok=True)
WORK = Path(os.environ.get("MPT_GPU_WORK", "/tmp/mpt_gpu_check"))
R: dict = {"steps": {}, "skipped": []}


def step(name):
    def deco(fn):
        t0 = time.perf_counter()
        try:
            R["steps"][name] = {"ok": True, **(fn() or {})}
        except Exception as e:  # a GPU check reports and goes on
            R["steps"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-1500:]}
        R["steps"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"== {name}: {json.dumps({k: v for k, v in R['steps'][name].items() if k != 'trace'})[:1500]}", flush=True)
        return fn
    return deco


@step("environment")
def env():
    import onnxruntime as ort
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
            "onnxruntime": ort.__version__, "ort_providers": ort.get_available_providers()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(0)))
    for mod in ("transformers", "peft", "onnx", "tensorrt"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


@step("demo bundle (export + validation vs PEFT)")
def demo():
    from mpt_export.tools.demo import run_demo

    r = run_demo(WORK / "demo", arch="llama-gqa")
    v = r["bundle"].info.validation
    return {"export_s": round(r["export_s"], 1), "logits_max_abs": v["logits_max_abs"], "kv_max_abs": v["kv_max_abs"],
            "outputs": r["outputs"]}


def _compare(session_b, label):
    import mpt_export

    b = mpt_export.load_bundle(WORK / "demo" / "bundle")
    ref = b.session()
    rng = np.random.default_rng(0)
    ids = rng.integers(2, ref.vocab_size, (4, 12))
    tasks = b.tasks
    diffs = {}
    out_ref, out_new = ref.forward(ids, tasks), session_b.forward(ids, tasks)
    for k in out_ref:
        diffs[k] = float(np.abs(out_ref[k].astype(np.float32) - out_new[k].astype(np.float32)).max())
    g_ref = ref.generate_ids(ids, tasks, max_new_tokens=16, eos_token_id=None)
    t0 = time.perf_counter()
    g_new = session_b.generate_ids(ids, tasks, max_new_tokens=16, eos_token_id=None)
    return {"max_abs_diff_per_output": {k: diffs[k] for k in list(diffs)[:5]}, "max_abs_diff": max(diffs.values()),
            "greedy_equal": bool((g_ref == g_new).all()), "generate_s": round(time.perf_counter() - t0, 3)}


@step("tensorrt engines vs onnxruntime")
def trt():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        R["skipped"].append("TensorRT: the tensorrt package is not importable on this machine; nothing TensorRT ran")
        return {"skipped": True}
    import mpt_export
    from mpt_export.export.trt_build import build_engines
    from mpt_export.runtime.trt.profiles import Limits

    b = mpt_export.load_bundle(WORK / "demo" / "bundle")
    t0 = time.perf_counter()
    eng = build_engines(b.path, WORK / "engines", Limits(max_batch=8, max_input=64, max_new_tokens=64))
    res = _compare(b.session(backend="tensorrt", engines=eng), "tensorrt")
    return {"build_s": round(time.perf_counter() - t0, 1), **res}


def _need_trt(what: str) -> bool:
    """False (skipped) where TensorRT is not importable; an error where it is but the first build did not land."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        R["skipped"].append(f"TensorRT ({what}): the tensorrt package is not importable on this machine")
        return False
    if not (WORK / "engines" / "engine.json").is_file():
        raise RuntimeError("the first TensorRT build (step 'tensorrt engines vs onnxruntime') failed: nothing to run")
    return True


@step("tensorrt: rows finishing early (EOS) equal onnxruntime")
def trt_early_eos():
    if not _need_trt("early EOS"):
        return {"skipped": True}
    import mpt_export

    b = mpt_export.load_bundle(WORK / "demo" / "bundle")
    ref, new = b.session(), b.session(backend="tensorrt", engines=WORK / "engines")
    rng = np.random.default_rng(1)
    ids = rng.integers(2, ref.vocab_size, (6, 10))
    tasks = [b.tasks[i % len(b.tasks)] for i in range(6)]
    free = ref.generate_ids(ids, tasks, max_new_tokens=12, eos_token_id=None)
    eos = int(free[0, 2])  # row 0 stops at its third token; other rows stop wherever they meet it, or run on
    a = ref.generate_detailed(ids, tasks, max_new_tokens=12, eos_token_id=eos)
    g = new.generate_detailed(ids, tasks, max_new_tokens=12, eos_token_id=eos)
    lengths = [int(x) for x in a.lengths]
    if len(set(lengths)) < 2:
        raise AssertionError(f"no row finished early (lengths {lengths}); the check did not exercise the gather")
    if not (a.ids == g.ids).all():
        raise AssertionError(f"tokens differ from ONNX Runtime: {a.ids.tolist()} vs {g.ids.tolist()}")
    return {"lengths": lengths, "tokens_equal": True}


@step("tensorrt: version-compatible engines load back")
def trt_version_compatible():
    if not _need_trt("version-compatible"):
        return {"skipped": True}
    import mpt_export
    from mpt_export.export.trt_build import build_engines
    from mpt_export.runtime.trt.profiles import Limits

    b = mpt_export.load_bundle(WORK / "demo" / "bundle")
    eng = build_engines(b.path, WORK / "engines-vc", Limits(max_batch=4, max_input=32, max_new_tokens=16),
                        version_compatible=True)
    side = json.loads((eng / "engine.json").read_text())
    ids = np.random.default_rng(2).integers(2, 200, (2, 8))
    ref = b.session().generate_ids(ids, b.tasks[:2], max_new_tokens=8, eos_token_id=None)
    got = b.session(backend="tensorrt", engines=eng).generate_ids(ids, b.tasks[:2], max_new_tokens=8, eos_token_id=None)
    if not (ref == got).all():
        raise AssertionError("version-compatible engine's tokens differ from ONNX Runtime's")
    return {"version_compatible": side["version_compatible"], "tokens_equal": True}


@step("tensorrt: second build reuses the first one's timing cache")
def trt_timing_cache():
    if not _need_trt("timing cache"):
        return {"skipped": True}
    from mpt_export.export.trt_build import build_engines
    from mpt_export.runtime.trt.profiles import Limits

    cache = WORK / "timing.cache"
    if cache.exists():
        cache.unlink()
    lim = Limits(max_batch=4, max_input=32, max_new_tokens=16)
    t0 = time.perf_counter()
    build_engines(WORK / "demo" / "bundle", WORK / "engines-tc1", lim, timing_cache=cache)
    first = time.perf_counter() - t0
    size = cache.stat().st_size
    t0 = time.perf_counter()
    build_engines(WORK / "demo" / "bundle", WORK / "engines-tc2", lim, timing_cache=cache)
    return {"first_build_s": round(first, 1), "second_build_s": round(time.perf_counter() - t0, 1),
            "cache_bytes": size, "cache_bytes_after": cache.stat().st_size}


@step("tensorrt: T5 bundle built and compared")
def trt_t5():
    if not _need_trt("T5"):
        return {"skipped": True}
    import mpt_export
    from mpt_export.tools.demo import build_demo_inputs
    from mpt_export.export.trt_build import build_engines
    from mpt_export.runtime.trt.profiles import Limits

    inp = build_demo_inputs(WORK / "t5", arch="t5", train=False)
    b = mpt_export.export_bundle(inp["base"], inp["adapters"], WORK / "t5" / "bundle", force=True)
    eng = build_engines(b.path, WORK / "engines-t5", Limits(max_batch=4, max_input=32, max_new_tokens=1))
    eng = build_engines(b.path, WORK / "engines-t5", Limits(max_batch=4, max_input=32, max_new_tokens=12))
    ids = np.random.default_rng(3).integers(2, 200, (3, 9))
    tasks = [b.tasks[i % len(b.tasks)] for i in range(3)]
    ref = b.session().generate_ids(ids, tasks, max_new_tokens=8, eos_token_id=None)
    got = b.session(backend="tensorrt", engines=eng).generate_ids(ids, tasks, max_new_tokens=8, eos_token_id=None)
    if not (ref == got).all():
        raise AssertionError(f"T5 tokens differ from ONNX Runtime: {ref.tolist()} vs {got.tolist()}")
    return {"tokens_equal": True, "built_with_max_new_tokens_1_too": True}


@step("trtexec: the printed commands run")
def trtexec_lines():
    import shlex
    import shutil
    import subprocess

    if not shutil.which("trtexec"):
        R["skipped"].append("trtexec: not on PATH; the --print-trtexec lines were not executed")
        return {"skipped": True}
    exe = Path(sys.executable).with_name("mpt-export")
    res = subprocess.run([str(exe), "build", str(WORK / "demo" / "bundle"), "--print-trtexec", "--out",
                          str(WORK / "engines-trtexec"), "--max-batch", "4", "--max-input", "32",
                          "--max-new-tokens", "16"], capture_output=True, text=True, check=True)
    (WORK / "engines-trtexec").mkdir(parents=True, exist_ok=True)
    done = []
    for block in res.stdout.replace("\\\n", " ").splitlines():  # continuation lines joined
        if not block.startswith("trtexec"):
            continue
        r = subprocess.run(shlex.split(block), capture_output=True, text=True, timeout=300)
        done.append(r.returncode)
        if r.returncode != 0:
            raise AssertionError(f"trtexec exited {r.returncode}: {(r.stderr or r.stdout)[-800:]}")
    if not done:
        raise AssertionError(f"no trtexec line found in: {res.stdout[:400]}")
    # the route's last step: adopt the plans (loaded and checked against the bundle), then generate on them
    adopt = next(line for line in res.stdout.splitlines() if line.startswith("mpt-export build") and "--adopt" in line)
    subprocess.run([str(exe), *shlex.split(adopt)[1:]], capture_output=True, text=True, check=True)
    import mpt_export

    b = mpt_export.load_bundle(WORK / "demo" / "bundle")
    got = b.session(backend="tensorrt", engines=WORK / "engines-trtexec").generate(["the movie was"], b.tasks[0],
                                                                                  max_new_tokens=8)
    want = b.session(graph="plain").generate(["the movie was"], b.tasks[0], max_new_tokens=8)
    return {"commands_run": len(done), "adopted": True, "same_text_as_onnxruntime": got == want}


@step("onnxruntime CUDA provider vs CPU")
def ort_cuda():
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        R["skipped"].append("ORT CUDA: this onnxruntime has no CUDAExecutionProvider (onnxruntime-gpu not installed)")
        return {"skipped": True}
    import mpt_export

    return _compare(mpt_export.load_bundle(WORK / "demo" / "bundle").session(provider="cuda"), "cuda")


@step("PyTorch CUDA baseline (PEFT eager) vs this runtime on CPU, GPT-2-small shape")
def baseline():
    import torch

    import mpt_export
    from mpt_export.tools.bench import PRESETS, prepare_preset
    from mpt_export.tools.bench_ref import peft_loop
    from mpt_export.export.torchside import adapters_from_bank, load_base_model
    from mpt_export.export.reference import peft_model_for

    p = PRESETS["gpt2-small-shape"]
    base, bundle_dir, names = prepare_preset("gpt2-small-shape", WORK / "bench", lambda s: print("  ", s, flush=True))
    b = mpt_export.load_bundle(bundle_dir)
    (ck, ck_names), = adapters_from_bank(b.task_bank())
    rng = np.random.default_rng(0)
    ids = rng.integers(2, p.vocab, (p.batch, p.input_len))
    tasks = [names[i % len(names)] for i in range(p.batch)]
    out = {}
    cpu_tokens = None
    s = b.session(intra_op_threads=torch.get_num_threads())
    s.generate_ids(ids, tasks, max_new_tokens=p.new_tokens, eos_token_id=None)
    t0 = time.perf_counter()
    for _ in range(3):
        cpu_tokens = s.generate_ids(ids, tasks, max_new_tokens=p.new_tokens, eos_token_id=None)
    out["ort_cpu_prompt_kv_s"] = round((time.perf_counter() - t0) / 3, 4)
    if not torch.cuda.is_available():
        R["skipped"].append("PyTorch CUDA: no GPU visible to torch")
        return out
    for dt in (torch.float32, torch.float16):
        model, _, _ = load_base_model(base, attn_implementation="sdpa")
        pm = peft_model_for(model.to("cuda", dt), ck)
        ids_t = torch.from_numpy(ids).cuda()
        task_ids = torch.tensor([ck_names.index(t) for t in tasks]).cuda()

        def run():
            toks = peft_loop(pm, ids_t, task_ids, p.new_tokens)
            torch.cuda.synchronize()
            return toks

        run()
        t0 = time.perf_counter()
        for _ in range(5):
            toks = run()
        key = str(dt).replace("torch.", "")
        out[f"peft_cuda_{key}_s"] = round((time.perf_counter() - t0) / 5, 4)
        out[f"peft_cuda_{key}_tokens_equal_ort_cpu"] = bool((toks == cpu_tokens).all())
        pm = model = None
        torch.cuda.empty_cache()
    new = p.batch * p.new_tokens
    out["tokens_per_batch"] = new
    return out


R["skipped"] = sorted(set(R["skipped"]))
(OUT / "gpu_check.json").write_text(json.dumps(R, indent=2, default=str))
print("\n| step | result | seconds |\n|---|---|---|")
for name, r in R["steps"].items():
    status = "skipped" if r.get("skipped") else ("pass" if r["ok"] else "FAIL: " + r["error"][:120])
    print(f"| {name} | {status} | {r.get('seconds', '')} |")
print("skipped:", *R["skipped"], sep="\n  ")

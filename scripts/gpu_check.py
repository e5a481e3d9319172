"""GPU check for mpt-export: report what the machine has, then run what it can.

1. Environment: Python, torch/CUDA/GPU, onnxruntime and its providers, tensorrt.
2. Demo bundle built in code here (exports with this machine's torch/transformers — a compatibility check too).
3. TensorRT importable: build engines for the demo bundle, compare with ONNX Runtime (max abs diff per output on the
   validation inputs) and time generation. Otherwise: say so.
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
    from mpt_export.demo import run_demo

    r = run_demo(WORK / "demo", arch="llama-gqa")
    v = r["bundle"].manifest["validation"]
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
    from mpt_export.trt.build import build_engines
    from mpt_export.trt.profiles import Limits

    b = mpt_export.load_bundle(WORK / "demo" / "bundle")
    t0 = time.perf_counter()
    eng = build_engines(b.path, WORK / "engines", Limits(max_batch=8, max_input=64, max_new_tokens=64))
    res = _compare(b.session(backend="tensorrt", engines=eng), "tensorrt")
    return {"build_s": round(time.perf_counter() - t0, 1), **res}


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
    from mpt_export.bench import PRESETS, _prepare
    from mpt_export.bench_ref import peft_loop
    from mpt_export.export.torchside import adapters_from_bank, load_base_model
    from mpt_export.export.reference import peft_model_for

    p = PRESETS["gpt2-small-shape"]
    base, bundle_dir, names = _prepare("gpt2-small-shape", WORK / "bench", lambda s: print("  ", s, flush=True))
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
print("skipped:", *R["skipped"], sep="\n  ")

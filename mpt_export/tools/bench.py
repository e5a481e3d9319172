"""Throughput of the runtime against PyTorch/PEFT eager, measured in one run on one machine.

Rows: PEFT eager (PyTorch, same thread count: PEFT's forward for the prefill, then a KV-cache loop over the base
model — PEFT's own ``generate`` re-injects the prompt at every step on some transformers releases, so it is not used),
this runtime with the prompt-KV cache off, and with it on. Each row: median latency per batch over repeated runs after
a warm-up, tokens/s, the ratio to PEFT, whether its greedy tokens equal PEFT's, and the floor — the matmul FLOPs the
work needs over this machine's measured matmul rate, and the weight bytes one decode step reads over its measured
memory bandwidth."""

from __future__ import annotations

import gc
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .bench_memory import measure_memory
from .bench_ref import flops_causal, flops_seq2seq, machine_rates, peft_loop, peft_seq2seq_loop
from ..errors import BundleError, InputError
from .presets import DERIVED, PRESETS, Preset, check_preset  # noqa: F401 - the presets, named where they run
from ..bundle.reader import load_bundle
from ..export.api import export_bundle
from ..export.quantize import quantize_bundle, QuantizeOptions
from ..export.reference import peft_model_for
from ..export.torchside import adapters_from_bank, load_base_model
from ..runtime.options import check_threads
from ..source.basemodel import check_same_base, identity
from ..source.hub import resolve
from ..storage.ownership import claim_workdir, remove_workdir, seal_workdir
from .demo import make_base_model, make_source_adapter
from .families import make_sized_model


def prepare_preset(preset_name: str, workdir: Path, on_step) -> tuple[Path, Path, list[str]]:
    """Base model, source adapter and bundle for a preset, built in code once and reused while the preset is the same."""
    p = PRESETS[preset_name]
    root = workdir / preset_name
    stamp, base, adapter, bundle = root / "preset.json", root / "base", root / "adapter", root / "bundle"
    names = [f"task{i}" for i in range(p.num_tasks)]
    contents = ["base", "adapter", "bundle", "preset.json", *DERIVED]  # DERIVED: made later, by this run or another
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(p):
        try:
            info = load_bundle(bundle).info
            if info.fused is None and info.fused_skipped is None:
                raise BundleError("exported before fused graphs existed")  # rebuilt as an export writes it today
            claim_workdir(root, "bench-workdir", contents=contents)  # names a newer version adds, before it writes them
            return base, bundle, names
        except BundleError:
            pass
    remove_workdir(root, "bench-workdir")  # only a bench workdir this tool made; anything else is refused
    claim_workdir(root, "bench-workdir", contents=contents)
    on_step(f"build {preset_name} base model and adapter (random weights)")
    if p.extra:  # a family by its transformers model_type

        model = make_sized_model(base, p.arch, hidden=p.hidden, layers=p.layers, heads=p.heads, vocab_size=p.vocab,
                                 max_positions=p.max_positions, ffn=p.ffn, **p.extra)
    else:
        model = make_base_model(base, arch=p.arch, hidden=p.hidden, layers=p.layers, heads=p.heads,
                                vocab_size=p.vocab, max_positions=p.max_positions, tokenizer=p.tokenizer, ffn=p.ffn)
    make_source_adapter(model, adapter, num_tasks=p.num_tasks, num_virtual_tokens=p.virtual_tokens,
                        num_ranks=p.rank, task_type="SEQ_2_SEQ_LM" if p.seq2seq else "CAUSAL_LM",
                        num_transformer_submodules=p.nts)
    del model
    on_step("export and validate the bundle")
    export_bundle(base, [f"{','.join(names)}={adapter}"], bundle, force=True, seed=0)
    stamp.write_text(json.dumps(asdict(p)))
    seal_workdir(root)
    return base, bundle, names


def _derived_is_current(out: Path, check) -> bool:
    """A derived bundle from an earlier run is reused only if it loads and ``check(manifest)`` says it was made from
    the same source (a bundle of the same name made from another model must not stand in for it). ``check`` gets
    the bundle's typed manifest."""
    try:
        with load_bundle(out) as b:
            return bool(check(b.info))
    except BundleError:
        return False


def _quantized_bundle(bundle_dir: Path, out: Path, scheme: str, on_step) -> Path:
    """The ``scheme`` copy of the bench's fp32 bundle, made once and reused while the fp32 bundle is the same."""
    options = QuantizeOptions(scheme=scheme, min_agreement=0.0)
    with load_bundle(bundle_dir, verify=False) as src:
        digest = src.info.digest

    def current(info):
        q = info.quantization or {}
        return q.get("source_manifest_sha256") == digest and q.get("scheme") == scheme and \
            all(q.get(k) == getattr(options, k) for k in ("variant", "block_size", "accuracy_level", "embeddings"))

    if _derived_is_current(out, current):
        return out
    on_step(f"quantize the bundle to {scheme} (once)")
    quantize_bundle(bundle_dir, out, options, force=True)
    return out


def _time(fn, repeats: int, warmup: int = 1):
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _fp16_bundle(base: Path, adapter_spec: str, out: Path, on_step) -> Path:
    ident = identity(base)["config_sha256"]
    if _derived_is_current(out, lambda info: info.base_model.config_sha256 == ident and
                           [a.get("path") for a in info.adapters] == [adapter_spec.partition("=")[2]]):
        return out
    on_step("export the fp16 bundle (once)")
    export_bundle(base, [adapter_spec], out, dtype="fp16", force=True, seed=0)
    return out


def preset_for_bundle(info, batch: int = 8, input_len: int = 64, new_tokens: int = 8) -> Preset:
    """The bench workload for a user's bundle (``info``: its typed manifest): its model's shape, its first adapter's
    prompt, a mixed-task batch."""
    bm, first = info.base_model, info.tasks[0]
    group = [t for t in info.tasks if t.source == first.source and t.shared_prompt == first.shared_prompt]
    arch = "t5" if info.seq2seq else bm.model_type or "llama"
    nts = info.num_transformer_submodules
    return Preset(arch, bm.hidden_size, bm.num_layers, bm.num_attention_heads, bm.vocab_size, bm.max_positions,
                  first.prompt_len // nts, len(group), first.rank, batch, input_len, new_tokens, nts=nts)


def run_bench(preset: str | None = "gpt2-small-shape", workdir: str | Path = "build/bench", repeats: int = 5,
              threads: int | None = None, on_step=None, bundle: str | Path | None = None,
              base_model: str | Path | None = None, batch: int = 8, input_len: int = 64, new_tokens: int = 8) -> dict:
    """Benchmark a preset (built once under ``workdir``) or a user's ``bundle`` with its ``base_model`` (PEFT's
    baseline needs it); returns rows and machine figures (see module docstring)."""
    if bundle is None:
        check_preset(preset)
    elif base_model is None:
        raise InputError("benchmarking a bundle needs --base-model (PEFT eager is the baseline measured in the same run)")
    else:
        base_model = resolve(base_model, "base model")
    if repeats < 1:
        raise InputError(f"repeats must be >= 1, got {repeats}")
    step = on_step or (lambda s: None)
    threads = _set_threads(threads)
    p, base, bundle_dir, names, derived, preset = _workload(preset, workdir, bundle, base_model, batch, input_len,
                                                            new_tokens, step)
    step("measure machine matmul rate and memory bandwidth")
    rates = machine_rates(threads)
    rng = np.random.default_rng(0)
    ids = rng.integers(2, p.vocab, (p.batch, p.input_len), dtype=np.int64)
    tasks = [names[i % len(names)] for i in range(p.batch)]
    peft = _peft_row(p, base, bundle_dir, ids, tasks, repeats, threads, step)
    variants, skipped = _variants(p, base, bundle_dir, derived, peft, step)
    rows, task_kv_ms = _runtime_rows(variants, ids, tasks, p, repeats, threads, peft["mem"], step)
    rows = [peft["row"], *rows]
    new = p.batch * p.new_tokens
    for r in rows:
        r["tokens_per_s"] = new / r["latency_s"]
        r["ratio_vs_peft"] = peft["row"]["latency_s"] / r["latency_s"]
        r["greedy_equal_peft"] = bool(np.array_equal(r["tokens"], peft["row"]["tokens"]))
        r["floor_s"] = r["flops"] / rates["matmul_flops_per_s"]
        r["share_of_floor"] = r["floor_s"] / r["latency_s"]
        r["tokens"] = r["tokens"].tolist()
    return {
        "skipped": skipped, "bytes_per_task": _bytes_per_task(peft["bundle"], p),
        "preset": preset, "config": asdict(p), "threads": threads, "repeats": repeats, "machine": rates,
        "weight_bytes": peft["weight_bytes"], "decode_step_bytes_floor_s": peft["weight_bytes"] / rates["mem_bytes_per_s"],
        "rows": rows, "task_kv_once_ms": task_kv_ms, "cpu_count": os.cpu_count(),
    }


def _set_threads(threads: int | None) -> int:
    """torch's thread count for the run (checked when given; torch's own default otherwise)."""
    import torch

    if threads is not None:
        check_threads(threads, "--threads")
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    return threads


def _workload(preset, workdir, bundle, base_model, batch: int, input_len: int, new_tokens: int, step):
    """What is measured: a user's bundle (its shape, its first adapter's tasks) or a preset's, built once.
    -> (preset, base model, bundle dir, task names, folder for derived bundles, the preset's label)"""
    if bundle is None:
        base, bundle_dir, names = prepare_preset(preset, Path(workdir), step)
        return PRESETS[preset], base, bundle_dir, names, bundle_dir.parent, preset

    user = load_bundle(bundle)
    check_same_base(base_model, user.base_model)
    p = preset_for_bundle(user.info, batch, input_len, new_tokens)
    names = user.info.task_names[: p.num_tasks]
    return p, Path(base_model), user.path, names, Path(workdir) / f"{user.path.name}-derived", f"bundle {user.path}"


def _peft_row(p: Preset, base: Path, bundle_dir: Path, ids, tasks, repeats: int, threads: int, step) -> dict:
    """PEFT eager, the baseline: its row, the FLOPs each variant needs, the weight bytes, the memory probe's spec,
    and the adapter measured (PEFT batches one adapter: its tasks are the workload). The model is freed after."""
    import torch

    step("PEFT eager")
    model, _, arch = load_base_model(base, attn_implementation="sdpa")  # PyTorch's fastest attention for the baseline
    b = load_bundle(bundle_dir)
    ck, ck_names = adapters_from_bank(b.task_bank())[0]  # PEFT batches one adapter: its tasks are the workload
    pm = peft_model_for(model, ck)
    task_ids = torch.tensor([ck_names.index(t) for t in tasks])
    ids_t = torch.from_numpy(ids)
    if p.seq2seq:
        start = int(b.base_model.get("decoder_start_token_id") or 0)
        t_peft, tok_peft = _time(lambda: peft_seq2seq_loop(pm, ids_t, task_ids, p.new_tokens, start), repeats)
        enc_p = sum(x.numel() for n, x in model.named_parameters() if n.startswith("encoder."))
        dec_p = sum(x.numel() for n, x in model.named_parameters() if n.startswith("decoder."))
        peft_flops = ours_flops = ours_cached_flops = flops_seq2seq(p, enc_p, dec_p)
    else:
        t_peft, tok_peft = _time(lambda: peft_loop(pm, ids_t, task_ids, p.new_tokens), repeats)
        body = sum(x.numel() for n, x in model.named_parameters() if "wte" not in n and "embed" not in n
                   and "lm_head" not in n and "wpe" not in n)
        peft_flops = flops_causal(p, body, p.virtual_tokens, True, True)
        ours_flops = flops_causal(p, body, p.virtual_tokens, True, False)
        ours_cached_flops = flops_causal(p, body, p.virtual_tokens, False, False)
    weight_bytes = sum(x.numel() * x.element_size() for x in {id(x): x for x in model.parameters()}.values())
    mem = {"ids": ids.tolist(), "tasks": tasks, "new": p.new_tokens, "threads": threads, "seq2seq": p.seq2seq,
           "start": int(b.base_model.get("decoder_start_token_id") or 0), "base": str(base)}
    step("memory: PEFT eager in a fresh process")
    peft_rss = measure_memory({**mem, "kind": "peft", "bundle": str(bundle_dir)})
    pm = model = None  # free the PyTorch model before the runtime rows
    gc.collect()
    row = {"name": "PEFT eager", "latency_s": t_peft, "tokens": tok_peft, "flops": peft_flops, "prefill_s": None,
           "decode_s": None, "peak_rss": peft_rss}
    return {"row": row, "flops": ours_flops, "cached_flops": ours_cached_flops, "weight_bytes": weight_bytes,
            "mem": mem, "bundle": b, "adapter": ck, "adapter_tasks": ck_names}


def _variants(p: Preset, base: Path, bundle_dir: Path, derived: Path, peft: dict, step):
    """The runtime rows to measure: (label, bundle, provider, prompt-KV cache, FLOPs) each, and what was skipped."""
    flops, cached = peft["flops"], peft["cached_flops"]
    variants = [("ORT", bundle_dir, "cpu", False, flops)]
    if not p.seq2seq:  # the encoder is bidirectional: no per-task prompt KV to cache
        variants.append(("ORT + prompt KV", bundle_dir, "cpu", True, cached))
    for scheme in ("int8", "int4", "int8-dynamic"):
        variants.append((f"ORT {scheme}" + ("" if p.seq2seq else " + prompt KV"),
                         _quantized_bundle(bundle_dir, derived / f"bundle-{scheme}", scheme, step), "cpu",
                         not p.seq2seq, cached if not p.seq2seq else flops))
    import onnxruntime as ort

    skipped = []
    if "CUDAExecutionProvider" in ort.get_available_providers():
        spec = f"{','.join(peft['adapter_tasks'])}={peft['adapter'].path}"
        variants.append(("ORT fp16 CUDA", _fp16_bundle(base, spec, derived / "bundle-fp16", step), "cuda", not p.seq2seq,
                         cached if not p.seq2seq else flops))
    else:
        skipped.append("fp16: no GPU execution provider in this onnxruntime (install onnxruntime-gpu on a GPU machine)")
    return variants, skipped


def _runtime_rows(variants, ids, tasks, p: Preset, repeats: int, threads: int, mem: dict, step):
    """One row per variant (the first is the fp32 reference the others' agreement is measured against), and the
    time to compute one task's prompt KV the first time. -> (rows, task_kv_once_ms)"""
    rows, task_kv_ms, fp32_tokens = [], None, None
    for label, bdir, provider, cache, flops in variants:
        step(label)
        gc.collect()
        s = load_bundle(bdir).session(provider=provider, intra_op_threads=threads)
        if cache:
            t0 = time.perf_counter()
            s.task_kv(tasks[0])
            if task_kv_ms is None:
                task_kv_ms = (time.perf_counter() - t0) * 1e3
        lat, res = _time(lambda c=cache: s.generate_detailed(ids, tasks, max_new_tokens=p.new_tokens, eos_token_id=None,
                                                             prompt_kv_cache=c), repeats)
        row = {"name": label, "latency_s": lat, "tokens": res.ids, "flops": flops,
               "prefill_s": res.timings["prefill_s"], "decode_s": res.timings["decode_s"],
               "tokens_processed": res.tokens_processed,
               "peak_rss": measure_memory({**mem, "kind": "ort", "bundle": str(bdir), "provider": provider,
                                            "cache": cache})}
        if fp32_tokens is None:
            fp32_tokens = res.ids
        else:  # teacher-forced top-1 agreement with the fp32 greedy sequence
            forced = s.generate_ids(ids, tasks, max_new_tokens=p.new_tokens, eos_token_id=None, forced_tokens=fp32_tokens,
                                    prompt_kv_cache=cache)
            row["agreement_vs_fp32"] = float((forced == fp32_tokens).mean())
            row["free_running_vs_fp32"] = float((res.ids == fp32_tokens).mean())
        rows.append(row)
        s = None
    return rows, task_kv_ms


def _bytes_per_task(b, p: Preset) -> dict:
    """What one more task costs: its vectors, its shared prompt, and the prompt KV kept per task (fp32)."""
    bank = b.task_bank()
    t0 = bank.tasks[0]
    bm = b.info.base_model  # prompt KV kept per task (fp32): layers x (key, value) x kv_heads x head_dim x P
    kv_bytes = 0 if p.seq2seq else 2 * bm.num_layers * bm.num_kv_heads * bm.head_dim * p.virtual_tokens * 4
    return {"vectors": int((t0.cols.size + t0.rows.size) * 4), "shared_prompt": int(bank.shared[0].nbytes),
            "prompt_kv_cache": kv_bytes}

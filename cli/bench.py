from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from ._common import Quiet, console, escape, handle_errors, progress, quiet_libraries
from mpt_export.errors import InputError
from mpt_export.storage.ownership import check_replaceable
from mpt_export.tools.bench import check_preset, run_bench
from mpt_export.tools.bench_peer import check_peer, run_peer_bench


@handle_errors
def bench_cmd(
    bundle: Annotated[Path | None, typer.Argument(help="A bundle to benchmark instead of a preset (needs --base-model).")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", metavar="DIR|HUB_ID", help="With BUNDLE: the base model it was exported from, a directory or a Hugging Face Hub id (PEFT baseline).")] = None,
    batch: Annotated[int, typer.Option(help="With BUNDLE: rows per batch.")] = 8,
    input_len: Annotated[int, typer.Option(help="With BUNDLE or --peer: input tokens per row (after the task's virtual tokens).")] = 64,
    new_tokens: Annotated[int, typer.Option(help="With BUNDLE: new tokens per row.")] = 8,
    preset: Annotated[str, typer.Option(help="Workload: gpt2-small-shape (GPT-2 small shape, 100 virtual tokens, 8 x 64 tokens, 8 new), t5-base-shape (T5-Base shape, 100 virtual tokens, 8 x 64, 4 new), llama-small (hidden 768, 12 layers, vocab 32000: the --peer comparison), qwen3-small, gemma2-small and gemma3-small (the same size with those families' features; --peer reads the first two), tiny, tiny-t5.")] = "gpt2-small-shape",
    workdir: Annotated[Path, typer.Option(help="Where the preset's model, adapter and bundle are built (reused while the preset is unchanged).")] = Path("build/bench"),
    repeats: Annotated[int, typer.Option(help="Timed runs per row (median reported) after one warm-up.")] = 5,
    threads: Annotated[int | None, typer.Option(help="Threads for PyTorch and ONNX Runtime alike.", show_default="PyTorch's")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw figures as JSON.")] = False,
    peer: Annotated[str | None, typer.Option(metavar="onnxruntime-genai|llama-cpp", help="Instead, ours against a peer on the same base model, interleaved rounds (--repeats), each side in fresh processes: onnxruntime-genai (its graphs: fp32, int8, int4; decode and end-to-end tok/s at batch 1 and 8; needs the peers extra) or llama-cpp (its GGUF conversion: f32, q8_0, q4_0; decode and prefill tok/s at batch 1 and the same context depth; needs a llama.cpp build, see --llama-cpp). Use with --preset llama-small, qwen3-small or gemma2-small.")] = None,
    llama_cpp: Annotated[Path | None, typer.Option("--llama-cpp", metavar="DIR", help="With --peer llama-cpp: llama.cpp's source folder with its build (build/bin/llama-bench and llama-quantize; convert_hf_to_gguf.py converts the model).", show_default="llama-bench on PATH")] = None,
    quiet: Quiet = False,
) -> None:
    """Throughput vs PyTorch/PEFT eager, measured in the same run: PEFT, this runtime without and with the prompt-KV cache."""
    if peer is not None:
        return _peer(peer, preset, workdir, repeats, threads, as_json, quiet, llama_cpp, input_len)
    if llama_cpp is not None:
        raise InputError("--llama-cpp goes with --peer llama-cpp")
    if bundle is None:
        check_preset(preset)  # a mistyped preset answers at once, not after torch loads
        check_replaceable(workdir / preset, "bench-workdir", force=True)  # before loading torch
    quiet_libraries()

    with progress("bench", quiet) as on_step:
        r = run_bench(preset=preset, workdir=workdir, repeats=repeats, threads=threads, on_step=on_step, bundle=bundle,
                      base_model=base_model, batch=batch, input_len=input_len, new_tokens=new_tokens)
    if as_json:
        print(json.dumps({**r, "rows": [{k: v for k, v in x.items() if k != "tokens"} for x in r["rows"]]}, indent=2))
        return
    c = r["config"]
    t = Table(title=f"bench {escape(str(r['preset']))}: batch {c['batch']} x {c['input_len']} tokens (mixed tasks), {c['virtual_tokens']} "
                    f"virtual tokens, {c['new_tokens']} new tokens, {r['threads']} threads", title_justify="left")
    t.box = box.SIMPLE_HEAD
    t.pad_edge = False
    for col in ("runtime", "ms/batch", "tok/s", "xPEFT", "=PEFT", "=fp32", "prefill", "decode", "floor", "%floor",
                "peak RSS"):
        t.add_column(col, justify="left" if col == "runtime" else "right", no_wrap=True)
    for x in r["rows"]:
        t.add_row(escape(x["name"]), f"{x['latency_s'] * 1e3:.0f}", f"{x['tokens_per_s']:.1f}", f"{x['ratio_vs_peft']:.2f}x",
                  "yes" if x["greedy_equal_peft"] else "no",
                  f"{x['agreement_vs_fp32']:.0%}/{x['free_running_vs_fp32']:.0%}" if "agreement_vs_fp32" in x else "-",
                  f"{x['prefill_s'] * 1e3:.0f}" if x["prefill_s"] is not None else "-",
                  f"{x['decode_s'] * 1e3:.0f}" if x["decode_s"] is not None else "-",
                  f"{x['floor_s'] * 1e3:.0f}", f"{x['share_of_floor'] * 100:.0f}%",
                  f"{x['peak_rss'] / 2**20:.0f} MiB" if x.get("peak_rss") else "-")
    m = r["machine"]
    t.caption = ("ms: median latency per batch; xPEFT: throughput ratio; =PEFT: same greedy tokens; prefill/decode/"
                 "floor in ms (floor: matmul FLOPs / measured rate). PEFT eager: PyTorch, PEFT forward + KV loop; ORT: "
                 "this runtime, prompt run with every request; ORT + prompt KV: each task's prompt KV computed once. "
                 f"machine: {m['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s fp32 matmul, {m['mem_bytes_per_s'] / 1e9:.1f} GB/s "
                 f"copy; decode-step floor (weights {r['weight_bytes'] / 2**20:.0f} MiB / bandwidth) "
                 f"{r['decode_step_bytes_floor_s'] * 1e3:.1f} ms"
                 + (f"; task prompt KV computed once: {r['task_kv_once_ms']:.0f} ms" if r["task_kv_once_ms"] else ""))
    console.print(t)
    pt = r["bytes_per_task"]
    console.print(f"bytes per task: {pt['vectors']} B of vectors (cols + rows), plus {pt['shared_prompt']} B for a shared "
                  f"prompt of its own (target tasks), plus {pt['prompt_kv_cache']} B of prompt KV while cached; "
                  "=fp32: greedy-token agreement with the fp32 run, teacher-forced/free-running; peak RSS: peak resident memory of a "
                  "fresh process that loads that row's model and runs one batch, minus the same process before loading")
    for sk in r["skipped"]:
        console.print(f"[yellow]skipped[/] {escape(sk)}")


def _peer(peer: str, preset: str, workdir: Path, rounds: int, threads: int | None, as_json: bool,
          quiet: bool = False, llama_cpp: Path | None = None, input_len: int = 64) -> None:
    check_peer(peer, llama_cpp)
    check_replaceable(workdir / preset, "bench-workdir", force=True)  # before loading torch
    quiet_libraries()

    with progress("bench", quiet) as on_step:
        r = run_peer_bench(peer, preset, workdir, rounds, threads, input_len=input_len, on_step=on_step,
                           llama_cpp=llama_cpp)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    metrics = r["rows"][0]["metrics"]  # decode and e2e (ONNX Runtime GenAI) or prefill (llama.cpp)
    t = Table(title=f"bench {escape(preset)} vs {escape(peer)}: {r['virtual_tokens']} virtual tokens + "
                    f"{r['input_len']} input tokens, {r['new_tokens']} new, {r['threads']} threads, {rounds} "
                    "interleaved rounds", title_justify="left")
    t.box = box.SIMPLE_HEAD
    for col in ("prec.", "batch", *(c for m in metrics for c in (f"{m} ours", "theirs", "ratio")), "RSS MiB"):
        t.add_column(col, justify="left" if col == "prec." else "right", no_wrap=True)
    def fig(f: dict) -> str:  # median (min); no decimals from 100 on, so the table fits 120 columns
        med, low = (f"{v:.0f}" if v >= 100 else f"{v:.1f}" for v in (f["median"], f["min"]))
        return f"{med} ({low})"

    for x in r["rows"]:
        a, b = x["ours"], x["peer"]
        t.add_row(x["precision"], str(x["batch"]),
                  *(c for m in metrics for c in (fig(a[m]), fig(b[m]), f"{x[m + '_ratio']:.2f}x")),
                  "/".join("-" if v is None else f"{v:.0f}" for v in x["peak_rss_mib"].values()))
    la = r["load_average"]
    if peer == "llama-cpp":
        what = ("decode: ours from the task's cached prompt KV, theirs (llama-bench) at the same context depth; "
                "prefill: the input after the virtual tokens; RSS MiB (ours/theirs): ours a fresh process's peak for "
                "loading the model and generating one batch minus the process after its imports, theirs llama-bench's "
                "whole peak")
    else:
        what = ("decode: the prefill cancels out; e2e (end to end): ours from the task's cached prompt KV, theirs "
                "prefilling the virtual tokens; RSS MiB (ours/theirs): a fresh process's peak resident memory for "
                "loading the model and generating one batch, minus the process after its imports")
    t.caption = ("tok/s: median (min) over the rounds, each side in a fresh process per round; ratio: ours / theirs; "
                 f"{what}. load average {la['before'][0]:.2f} before, {la['after'][0]:.2f} after the timed rounds")
    console.print(t)
    for q, s in r["settings"].items():
        console.print(f"{q}: ours ({r['graphs'][q]}) {escape(s['ours'])}; theirs {escape(s['peer'])}")

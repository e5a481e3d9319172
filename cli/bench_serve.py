from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from ._common import Quiet, console, escape, handle_errors, progress, quiet_libraries
from mpt_export.errors import InputError
from mpt_export.tools.bench import prepare_preset
from mpt_export.tools.bench_serve import check_serve_peer, run_bench_ray, run_bench_serve
from mpt_export.tools.presets import check_preset


@handle_errors
def bench_serve_cmd(
    bundle: Annotated[Path | None, typer.Argument(help="Bundle to serve.", show_default="the --preset's, built under --workdir")] = None,
    preset: Annotated[str, typer.Option(help="Without BUNDLE: the bench preset whose bundle to serve (see `mpt-export bench --help`).")] = "gpt2-small-shape",
    workdir: Annotated[Path, typer.Option(help="Where the preset's bundle is built (shared with `mpt-export bench`).")] = Path("build/bench"),
    clients: Annotated[int, typer.Option(help="Concurrent clients (in a process of their own).")] = 16,
    requests: Annotated[int | None, typer.Option(help="Requests per mode.", show_default="4 per client")] = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens per request.")] = 64,
    max_tokens: Annotated[int, typer.Option(help="New tokens per request.")] = 32,
    max_batch: Annotated[int | None, typer.Option(help="Server --max-batch.", show_default="--clients")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads for the server and the ceiling.", show_default="one per core")] = None,
    tasks: Annotated[int | None, typer.Option(help="Spread the requests uniformly at random over this many tasks (a copy of the bundle with as many is built once under --workdir): what the per-task prompt-KV cache gives when few requests share a task.", show_default="round-robin over the bundle's tasks")] = None,
    kv_cache_mib: Annotated[float | None, typer.Option(help="The server's --kv-cache-mib (memory for tasks' prompt keys/values).", show_default="serve's default")] = None,
    peer: Annotated[str | None, typer.Option(metavar="vllm", help="Also the concurrent load against vLLM serving the same base model (each task's virtual tokens as ordinary prompt tokens there): throughput and TTFT p50/p99 side by side. Needs --vllm-url, or vllm on PATH (started on the preset's base model).")] = None,
    vllm_url: Annotated[str | None, typer.Option("--vllm-url", metavar="URL", help="With --peer vllm: a running vLLM server of the same base model (e.g. http://127.0.0.1:8000).")] = None,
    vllm_model: Annotated[str | None, typer.Option("--vllm-model", metavar="NAME", help="With --peer vllm: the model name to request.", show_default="the first of its /v1/models")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw figures as JSON.")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Instead: the same load through `serve --ray` with each --replicas count (each replica --threads cores; 1 without it), then the time to replace a killed replica.")] = False,
    replicas: Annotated[str, typer.Option(help="With --ray: replica counts to compare, comma-separated.")] = "1,2",
    quiet: Quiet = False,
) -> None:
    """The real server under N concurrent mixed-task clients vs the same requests one at a time vs the ceiling."""
    if bundle is None:
        check_preset(preset)  # a mistyped preset answers at once, not after torch loads
    base = workdir / preset / "base" if bundle is None else None  # what an installed vLLM is started on
    check_serve_peer(peer, vllm_url, base)
    if ray and peer is not None:
        raise InputError("--peer applies without --ray")
    quiet_libraries()

    with progress("bench-serve", quiet) as on_step:
        if bundle is None:
            _, bundle, _ = prepare_preset(preset, workdir, on_step)
        if ray:
            if tasks is not None or kv_cache_mib is not None:
                raise InputError("--tasks and --kv-cache-mib apply without --ray")
            try:
                counts = tuple(int(x) for x in replicas.split(","))
            except ValueError:
                raise InputError(f"--replicas takes comma-separated counts (e.g. 1,2), got {replicas!r}") from None
            r = run_bench_ray(bundle, counts, clients=clients, requests=requests, prompt_len=prompt_len,
                              max_tokens=max_tokens, threads=threads or 1, max_batch=max_batch,
                              workdir=workdir / "serve", on_step=on_step)
        else:
            r = run_bench_serve(bundle, clients=clients, requests=requests, prompt_len=prompt_len, max_tokens=max_tokens,
                                max_batch=max_batch, threads=threads, workdir=workdir / "serve", on_step=on_step,
                                tasks=tasks, kv_cache_mib=kv_cache_mib, peer=peer, vllm_url=vllm_url,
                                vllm_model=vllm_model, base_model=base)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    if ray:
        _print_ray(r)
        return
    _print_serve(r)


def _print_serve(r: dict) -> None:
    spread = (f"uniform over {r['tasks']:,} tasks" if r["tasks"] is not None else "mixed tasks")
    t = Table(title=escape(f"bench-serve {r['bundle']}: {r['requests']} requests x {r['prompt_len']} prompt tokens, "
                           f"{r['max_tokens']} new, {spread}, greedy"), title_justify="left")
    t.box = box.SIMPLE_HEAD
    for col in ("mode", "req/s", "tok/s", "x seq", "TTFT p50", "TTFT p95", "tok lat p50", "tok lat p95", "batch",
                "KV hits"):
        t.add_column(col, justify="left" if col == "mode" else "right", no_wrap=True)

    def ms(x):
        return f"{x * 1e3:.0f} ms" if x == x else "-"

    for label, row in (("one at a time", r["sequential"]), (f"{r['clients']} clients", r["concurrent"])):
        t.add_row(label, f"{row['requests_per_s']:.2f}", f"{row['tokens_per_s']:.1f}", f"{row['ratio_vs_sequential']:.2f}x",
                  ms(row["ttft_p50_s"]), ms(row["ttft_p95_s"]), ms(row["tpot_p50_s"]), ms(row["tpot_p95_s"]),
                  f"{row['mean_batch']:.1f}", f"{row['cache_hit_rate']:.0%}" if row["cache_hit_rate"] == row["cache_hit_rate"] else "-")
    c = r["ceiling"]
    t.add_row("ceiling (no HTTP)", "-", f"{c['tokens_per_s']:.1f}",
              f"{c['ratio_vs_sequential']:.2f}x", "-", "-", "-", "-", str(r["clients"]), "-")
    p = r.get("peer")
    if p:
        t.add_row(escape(f"vllm, {r['clients']} clients"), f"{p['requests_per_s']:.2f}", f"{p['tokens_per_s']:.1f}", "-",
                  ms(p["ttft_p50_s"]), ms(p["ttft_p95_s"]), ms(p["tpot_p50_s"]), ms(p["tpot_p95_s"]), "-", "-")
    t.caption = ((f"vs vllm ({escape(p['model'])} at {escape(p['url'])}): ours {r['concurrent']['tokens_per_s']:.1f} tok/s / "
                  f"theirs {p['tokens_per_s']:.1f} = {p['ratio_ours_vs_peer']:.2f}x; TTFT p99 ours "
                  f"{ms(r['concurrent']['ttft_p99_s'])}, theirs {ms(p['ttft_p99_s'])}. " if p else "") +
                 f"served tokens/s = {r['served_vs_ceiling']:.0%} of the ceiling (one Session.generate on a batch of {r['clients']}); batch: mean rows per decode step "
                 "(scheduler step record); tok lat: per-token latency after the first; KV hits: requests that found their "
                 f"task's prompt keys/values cached ({r['cache_entries']} held at the end; a miss runs the task's virtual tokens)")
    console.print(t)


def _print_ray(r: dict) -> None:
    t = Table(title=escape(f"bench-serve --ray {r['bundle']}: {r['requests']} requests x {r['prompt_len']} prompt "
                           f"tokens, {r['max_tokens']} new, {r['clients']} clients, mixed tasks, greedy; "
                           f"{r['threads']} core(s) per replica, {r['cpus']} cores here"), title_justify="left")
    t.box = box.SIMPLE_HEAD
    for col in ("replicas", "req/s", "tok/s", "x 1st", "TTFT p50", "TTFT p95", "ready in"):
        t.add_column(col, justify="right", no_wrap=True)
    for row in r["rows"]:
        t.add_row(str(row["replicas"]), f"{row['requests_per_s']:.2f}", f"{row['tokens_per_s']:.1f}",
                  f"{row['ratio_vs_first']:.2f}x", f"{row['ttft_p50_s'] * 1e3:.0f} ms",
                  f"{row['ttft_p95_s'] * 1e3:.0f} ms", f"{row['start_s']:.1f} s")
    rep = r.get("replace")
    if rep:
        t.caption = (f"killed replica replaced in {rep['replace_s']:.1f} s; {rep['requests_meanwhile']} requests sent "
                     f"meanwhile, {rep['failed_meanwhile']} failed")
    console.print(t)

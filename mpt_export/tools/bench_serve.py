"""``mpt-export bench-serve``: the real server on localhost under load, against the same requests one at a time, and
against the ceiling without HTTP — all measured in one run on one machine.

- **concurrent**: ``clients`` clients (in a process of their own, streaming over HTTP) each send requests back to back,
  mixed tasks, ``prompt_len``-token prompts (token ids), ``max_tokens`` new tokens, greedy;
- **one at a time**: the same requests, one client;
- **ceiling**: one ``Session.generate`` over a batch of ``clients`` such requests, in this process, no HTTP.

Reported per mode: requests/s, tokens/s, the ratio to one-at-a-time, p50/p95 time to first token and per-token
latency (after the first), and — from the scheduler's step record — the mean batch size of the decode steps.

``tasks=N`` spreads the requests uniformly at random over N tasks (a copy of the bundle with N tasks is built once
under the workdir, hard-linking the graphs): what the per-task prompt-KV cache is worth when few requests share a
task. The cache's hits and misses over each mode come from the server's ``/metrics``.

``peer="vllm"``: the concurrent mode's requests, from as many clients, against a vLLM server of the same base model
(``vllm_url``, one already running; else an installed ``vllm`` started here on the preset's base model) — vLLM has
no prompt tuning, so each task's virtual tokens are ordinary prompt tokens there (a fixed random prefix per task,
which its prefix cache may keep): throughput and time to first token p50/p99 side by side, measured after ours.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from ..bundle.reader import load_bundle
from ..errors import InputError, MptExportError
from ..serving.http.options import ServeOptions
from ..serving.ray.service import free_port, import_ray
from ..storage.ownership import claim_workdir
from .manytasks import bundle_with_tasks, cache_counts, hit_rate
from .procs import drain_stderr, stop
from .serve_peer import check_serve_peer, vllm_peer


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def client_main(argv=None) -> None:
    """The load generator (own process, one asyncio loop — light on the cores it shares with the server):
    ``python -m mpt_export.tools.bench_serve URL SPEC.json`` -> JSON on stdout."""
    import httpx

    url, spec = (argv or sys.argv[1:])[:2]
    spec = json.loads(Path(spec).read_text())
    jobs = spec["jobs"]  # [{"task", "prompt": [ids], "max_tokens"}]
    clients = int(spec["clients"])
    headers = {"Authorization": f"Bearer {spec['key']}"} if spec.get("key") else {}
    results = []
    todo = list(enumerate(jobs))

    async def one(http, i, job):
        t0 = time.perf_counter()
        first = last = None
        n = 0
        body = {"model": job["task"], "prompt": job["prompt"], "max_tokens": job["max_tokens"], "temperature": 0,
                "stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                raise SystemExit(f"request {i} failed: {r.status_code} {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.perf_counter()
                flat = line.replace(" ", "")  # no JSON parsing per token: the client stays light
                if '"choices":[]' in flat and '"usage":{' in flat:
                    n = json.loads(line[6:])["usage"]["completion_tokens"]
                    continue
                if '"finish_reason":null' in flat:  # a token chunk (the finish chunk carries none)
                    first = first or now
                    last = now
        results.append({"i": i, "t0": t0, "ttft": (first or time.perf_counter()) - t0,
                        "tpot": ((last - first) / (n - 1)) if first and last and n > 1 else None,
                        "tokens": n, "t_end": time.perf_counter()})

    async def worker(http):
        while todo:
            i, job = todo.pop(0)
            await one(http, i, job)

    async def main():
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, timeout=600, headers=headers, limits=limits) as http:
            await asyncio.gather(*(worker(http) for _ in range(clients)))

    t_start = time.perf_counter()
    asyncio.run(main())
    print(json.dumps({"wall_s": time.perf_counter() - t_start, "results": results}))


def _load(url: str, jobs: list[dict], clients: int, key: str | None, workdir: Path) -> dict:
    spec = workdir / f"load-{clients}.json"
    spec.write_text(json.dumps({"jobs": jobs, "clients": clients, "key": key}))
    res = subprocess.run([sys.executable, "-m", "mpt_export.tools.bench_serve", url, str(spec)], capture_output=True,
                         text=True, timeout=3600)
    if res.returncode != 0:
        raise MptExportError(f"the load generator failed: {(res.stderr or res.stdout).strip()[-400:]}")
    out = json.loads(res.stdout)
    rs = out["results"]
    tokens = sum(r["tokens"] for r in rs)
    return {"clients": clients, "requests": len(rs), "wall_s": out["wall_s"], "tokens": tokens,
            "requests_per_s": len(rs) / out["wall_s"], "tokens_per_s": tokens / out["wall_s"],
            "ttft_p50_s": _pct([r["ttft"] for r in rs], 50), "ttft_p95_s": _pct([r["ttft"] for r in rs], 95),
            "ttft_p99_s": _pct([r["ttft"] for r in rs], 99),
            "tpot_p50_s": _pct([r["tpot"] for r in rs if r["tpot"]], 50),
            "tpot_p95_s": _pct([r["tpot"] for r in rs if r["tpot"]], 95)}


def _steps(url: str, key: str | None, since: int = 0) -> dict:
    """The server's step record after step ``since``: {"steps": [...], "step_count": N}."""
    import httpx

    h = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(url + "/admin/steps", params={"since": since}, headers=h, timeout=30).json()


def _ceiling(s, batch: list[dict], max_tokens: int, step) -> dict:
    """One ``Session.generate`` over the batch, no HTTP: median of three after a warm-up."""
    step(f"ceiling: Session.generate on a batch of {len(batch)}, no HTTP")
    ids = np.array([j["prompt"] for j in batch], np.int64)
    rows = [j["task"] for j in batch]
    s.generate_detailed(ids, rows, max_new_tokens=max_tokens, eos_token_id=None)  # warm-up, prompt KV
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = s.generate_detailed(ids, rows, max_new_tokens=max_tokens)
        times.append(time.perf_counter() - t0)
    ceiling = {"tokens": int(res.lengths.sum()), "wall_s": statistics.median(times)}
    ceiling["tokens_per_s"] = ceiling["tokens"] / ceiling["wall_s"]
    return ceiling


def _served(bundle, jobs, other, warm, names, clients, max_batch, threads, kv_cache_mib, workdir, step):
    """The server in a process of its own: warmed up (``warm``: requests of the measured distribution, else one
    per task), then ``jobs`` one at a time and ``other`` from ``clients`` clients. -> (sequential, concurrent, cache
    entries)."""
    step("start the server")
    exe = Path(sys.executable).with_name("mpt-export")
    key = "bench-" + os.urandom(6).hex()
    args = [str(exe), "serve", str(bundle), "--port", "0", "--api-key", key, "--quiet",  # no access log
            "--max-batch", str(max_batch or clients), "--kv-cache-mib", str(kv_cache_mib)] + (
        ["--threads", str(threads)] if threads else [])
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in proc.stderr:
            if "listening on http://" in line:
                url = line.split("listening on ")[1].split()[0]
            if "serving " in line or "error:" in line:
                break
        if url is None or proc.poll() is not None:
            raise InputError(f"the server did not start ({line.strip()})")
        drain_stderr(proc)  # whatever it says later never fills the pipe
        _load(url, jobs[:1], 1, key, workdir)  # warm-up: every graph and the first task's prompt KV
        if warm is None:
            _load(url, [dict(j, max_tokens=2) for j in jobs[:len(names)]], len(names), key, workdir)  # every task's KV
        else:  # as many other requests of the same distribution: the caches as a long-running server has them
            _load(url, [dict(j, max_tokens=2) for j in warm], clients, key, workdir)
        step(f"one at a time: {len(jobs)} requests")
        c0 = cache_counts(url, key)
        sequential = _load(url, jobs, 1, key, workdir)
        c1 = cache_counts(url, key)
        step(f"concurrent: {clients} clients, {len(jobs)} requests")
        since = _steps(url, key, 1 << 62)["step_count"]
        concurrent = _load(url, other, clients, key, workdir)
        c2 = cache_counts(url, key)
        decode = [x["batch"] for x in _steps(url, key, since)["steps"] if x["kind"] == "decode"]
    finally:
        stop(proc, timeout=60)
    concurrent["mean_batch"] = float(np.mean(decode)) if decode else 0.0
    sequential["mean_batch"] = 1.0
    sequential.update(hit_rate(c0, c1))
    concurrent.update(hit_rate(c1, c2))
    return sequential, concurrent, int(c2.get("entries", 0))


def run_bench_serve(bundle: str | Path, clients: int = 16, requests: int | None = None, prompt_len: int = 64,
                    max_tokens: int = 32, max_batch: int | None = None, threads: int | None = None,
                    workdir: str | Path = "build/bench-serve", on_step=None, tasks: int | None = None,
                    kv_cache_mib: float | None = None, peer: str | None = None, vllm_url: str | None = None,
                    vllm_model: str | None = None, base_model: str | Path | None = None) -> dict:
    """``tasks``: spread the requests uniformly at random over that many tasks (a copy of the bundle with as many
    is built under ``workdir``); None: round-robin over the bundle's own. ``kv_cache_mib``: the server's (None: serve's
    default). ``peer="vllm"``: see the module docstring (``base_model``: what an installed vLLM is started on)."""
    step = on_step or (lambda s: None)
    check_serve_peer(peer, vllm_url, base_model)
    if clients < 1 or prompt_len < 1 or max_tokens < 1 or (tasks is not None and tasks < 1):
        raise InputError("--clients, --prompt-len, --max-tokens and --tasks must be >= 1")
    requests = requests or 4 * clients
    workdir = claim_workdir(Path(workdir), "bench-serve-workdir")
    source = bundle
    if tasks is not None:
        bundle = bundle_with_tasks(bundle, tasks, workdir, step)
    b = load_bundle(bundle)
    names = b.tasks
    plens = {t.name: t.prompt_len for t in b.info.tasks}  # the virtual tokens a peer gets as prompt tokens
    vocab = int(b.base_model["vocab_size"])
    rng = np.random.default_rng(0)

    def draw(count, rng):
        if tasks is None:
            return [{"task": names[i % len(names)], "prompt": rng.integers(2, vocab, prompt_len).tolist(),
                     "max_tokens": max_tokens} for i in range(count)]
        pick = rng.integers(0, tasks, count)  # uniform over the first ``tasks`` of the bundle
        return [{"task": names[int(k)], "prompt": rng.integers(2, vocab, prompt_len).tolist(),
                 "max_tokens": max_tokens} for k in pick]

    jobs = draw(requests, rng)
    warm = draw(requests, np.random.default_rng(1))  # the same distribution: the cache in its steady state
    # spread over many tasks, each mode draws its own requests (the same ones would find the tasks the other used)
    other = draw(requests, np.random.default_rng(2)) if tasks is not None else jobs
    s = b.session(intra_op_threads=threads)
    s.check_request(prompt_len, names[0], max_tokens)  # fits the model, or one clear error now

    ceiling = _ceiling(s, jobs[:clients], max_tokens, step)
    kv = s.cache_stats()["prompt_kv"]
    task_kv_bytes = kv["bytes"] / max(kv["entries"], 1)  # one task's prompt keys/values
    del s
    b.close()
    mib = ServeOptions.kv_cache_mib if kv_cache_mib is None else kv_cache_mib
    fits = tasks is not None and tasks * task_kv_bytes <= mib * 2**20
    if fits:  # every task's KV fits the server's cache: a long-running server holds them all, so warm them all
        warm = [dict(jobs[0], task=names[k]) for k in range(tasks)]
    sequential, concurrent, cache_entries = _served(bundle, jobs, other, warm if tasks is not None else None, names,
                                                    clients, max_batch, threads, mib, workdir, step)
    for row in (sequential, concurrent):
        row["ratio_vs_sequential"] = row["tokens_per_s"] / sequential["tokens_per_s"]
    ceiling["ratio_vs_sequential"] = ceiling["tokens_per_s"] / sequential["tokens_per_s"]
    theirs = None
    if peer == "vllm":
        used = sorted({j["task"] for j in other})
        prefixes = {t: np.random.default_rng([3, k]).integers(2, vocab, plens[t]).tolist() for k, t in enumerate(used)}
        theirs = vllm_peer(vllm_url, vllm_model, base_model, other, prefixes, clients, workdir, step, _load)
        theirs["ratio_ours_vs_peer"] = concurrent["tokens_per_s"] / theirs["tokens_per_s"]
    return {"peer": theirs,"bundle": str(source), "tasks": tasks, "bundle_tasks": len(names), "clients": clients,
            "requests": len(jobs), "prompt_len": prompt_len, "max_tokens": max_tokens, "threads": threads,
            "sequential": sequential, "concurrent": concurrent, "ceiling": ceiling, "cache_entries": cache_entries,
            "task_kv_bytes": task_kv_bytes, "kv_cache_mib": mib, "warmed_every_task": fits,
            "served_vs_ceiling": concurrent["tokens_per_s"] / ceiling["tokens_per_s"]}


def _ray_server(bundle, replicas: int, threads: int, max_batch: int, key: str, tmp: Path):
    """``mpt-export serve --ray`` in a process of its own (a local Ray instance below it). -> (process, url)."""
    port = free_port("127.0.0.1")
    exe = Path(sys.executable).with_name("mpt-export")
    args = [str(exe), "serve", str(bundle), "--ray", "--replicas", str(replicas), "--threads", str(threads),
            "--port", str(port), "--api-key", key, "--max-batch", str(max_batch), "--quiet"]
    env = {**os.environ, "RAY_TMPDIR": str(tmp), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stderr:
        lines.append(line.strip())
        if "serving " in line or "error:" in line:
            break
    if proc.poll() is not None or not any("serving " in x for x in lines):
        stop(proc)
        raise MptExportError(f"the Ray server did not start: {' | '.join(lines[-3:])}")
    drain_stderr(proc)
    return proc, f"http://127.0.0.1:{port}"


def _replace_time(url: str, key: str, job: dict, timeout: float = 120) -> dict:
    """Kill one replica's process (its pid from /health) and time until a new replica answers; every request
    sent meanwhile must succeed."""
    import httpx

    h = {"Authorization": f"Bearer {key}"}
    pids = {}
    for _ in range(200):
        r = httpx.get(url + "/health", timeout=30).json()
        pids[r["replica"]] = r["pid"]
        if len(pids) >= 2:
            break
    victim, pid = sorted(pids.items())[0]
    os.kill(pid, signal.SIGKILL)
    t0 = time.perf_counter()
    seen, sent, failed = set(), 0, 0
    body = {"model": job["task"], "prompt": job["prompt"], "max_tokens": 2, "temperature": 0}
    while time.perf_counter() - t0 < timeout:
        r = httpx.post(url + "/v1/completions", json=body, headers=h, timeout=60)
        sent += 1
        failed += r.status_code != 200
        seen.add(r.headers.get("x-mpt-export-replica"))
        if seen - set(pids):
            return {"replace_s": time.perf_counter() - t0, "requests_meanwhile": sent, "failed_meanwhile": failed}
    raise MptExportError(f"no replacement replica answered within {timeout:g} s of killing {victim}")


def run_bench_ray(bundle: str | Path, replicas: tuple[int, ...] = (1, 2), clients: int = 8,
                  requests: int | None = None, prompt_len: int = 32, max_tokens: int = 16, threads: int = 1,
                  max_batch: int | None = None, workdir: str | Path = "build/bench-serve", on_step=None) -> dict:
    """``mpt-export bench-serve --ray``: the same mixed-task load through Ray Serve with 1, 2, ... replicas of
    ``threads`` cores each (requests/s as a ratio to the first), then the time Serve takes to replace a killed
    replica."""
    import_ray()
    step = on_step or (lambda s: None)
    if clients < 1 or prompt_len < 1 or max_tokens < 1 or threads < 1 or not replicas or min(replicas) < 1:
        raise InputError("--clients, --prompt-len, --max-tokens, --threads and --replicas must be >= 1")
    requests = requests or 4 * clients
    workdir = claim_workdir(Path(workdir), "bench-serve-workdir")
    b = load_bundle(bundle)
    tasks, vocab = b.tasks, int(b.base_model["vocab_size"])
    b.session(intra_op_threads=threads).check_request(prompt_len, tasks[0], max_tokens)
    b.close()
    rng = np.random.default_rng(0)
    jobs = [{"task": tasks[i % len(tasks)], "prompt": rng.integers(2, vocab, prompt_len).tolist(),
             "max_tokens": max_tokens} for i in range(requests)]
    key = "bench-" + os.urandom(6).hex()
    rows, replace = [], None
    for n in replicas:
        step(f"Ray Serve, {n} replica(s) of {threads} core(s): {clients} clients, {len(jobs)} requests")
        tmp = tempfile.mkdtemp(prefix="mptray", dir="/tmp")  # Ray's socket paths must stay short
        t0 = time.perf_counter()
        proc, url = _ray_server(bundle, n, threads, max_batch or clients, key, Path(tmp))
        start_s = time.perf_counter() - t0
        try:
            _load(url, [dict(j, max_tokens=2) for j in jobs[:4 * n * len(tasks)]], clients, key, workdir)  # warm-up
            row = _load(url, jobs, clients, key, workdir)
            row.update(replicas=n, start_s=start_s)
            rows.append(row)
            if n >= 2 and replace is None:
                step("kill one replica, time its replacement")
                replace = _replace_time(url, key, jobs[0])
        finally:
            stop(proc)

            shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row["ratio_vs_first"] = row["requests_per_s"] / rows[0]["requests_per_s"]
    return {"bundle": str(bundle), "clients": clients, "requests": len(jobs), "prompt_len": prompt_len,
            "max_tokens": max_tokens, "threads": threads, "cpus": os.cpu_count(), "rows": rows, "replace": replace}


if __name__ == "__main__":
    client_main()

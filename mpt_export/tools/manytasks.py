"""What ``bench-serve --tasks N`` needs: a bundle with many tasks, built for the run, and the server's prompt-KV cache
counters read from ``/metrics`` around each mode."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..bundle.reader import load_bundle

BENCH_TASK = "bench-{:06d}"


def bundle_with_tasks(bundle: str | Path, n: int, workdir: Path, on_step=None) -> Path:
    """``bundle`` with ``n`` tasks: the bundle itself when it has them, else a copy under ``workdir`` (its graphs
    hard-linked) given ``n`` minus its own tasks more, made from its first task's vectors with a little noise — one
    many-task adapter added the way ``tasks add --names-file`` adds it. Built once per (source manifest, n)."""

    from safetensors.numpy import save_file

    from ..export.task_edits import add_tasks

    bundle = Path(bundle)
    with load_bundle(bundle, verify=False) as b:
        have = list(b.tasks)
        if n <= len(have):
            return bundle
        bank = b.task_bank()
        first = bank.task(have[0])
        shared = bank.shared[first.shared]
        task_type, nts, hidden = b.task_type, b.info.num_transformer_submodules, b.info.base_model.hidden_size
    stamp = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()[:16] + f"-{n}"
    out = workdir / f"tasks-{n}"
    if (out / ".source").is_file() and (out / ".source").read_text() == stamp:
        return out / "bundle"
    (on_step or (lambda s: None))(f"a copy of the bundle with {n:,} tasks (built once)")
    tmp = workdir / f".tasks-{n}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # (under our own workdir: a stale copy of an older source)
    tmp.mkdir(parents=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(bundle, tmp / "bundle", copy_function=link)
    extra = n - len(have)
    rng = np.random.default_rng(n)
    cols = (first.cols[None] * (1 + 0.05 * rng.standard_normal((extra, *first.cols.shape)))).astype(np.float32)
    rows = (first.rows[None] * (1 + 0.05 * rng.standard_normal((extra, *first.rows.shape)))).astype(np.float32)
    adapter = tmp / "adapter"
    adapter.mkdir()
    T, r = first.cols.shape
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "MULTITASK_PROMPT_TUNING", "task_type": task_type, "num_virtual_tokens": T // nts,
        "token_dim": hidden, "num_tasks": extra, "num_ranks": r, "num_transformer_submodules": nts}))
    save_file({"prompt_embeddings": np.ascontiguousarray(shared, np.float32), "prefix_task_cols": cols,
               "prefix_task_rows": rows}, str(adapter / "adapter_model.safetensors"))
    names = [BENCH_TASK.format(i) for i in range(extra)]
    add_tasks(tmp / "bundle", [f"{','.join(names)}={adapter}"]).close()
    shutil.rmtree(adapter)
    (tmp / ".source").write_text(stamp)
    tmp.rename(out)
    return out / "bundle"


def cache_counts(url: str, key: str | None) -> dict:
    """The server's prompt-KV cache counters from /metrics: {"hits", "misses", "evictions", "entries"}."""
    import httpx

    h = {"Authorization": f"Bearer {key}"} if key else {}
    text = httpx.get(url + "/metrics", headers=h, timeout=30).text
    out = {}
    for line in text.splitlines():
        if 'cache="prompt_kv"' in line and not line.startswith("#"):
            name = line.split("{")[0].removeprefix("mpt_export_cache_").removesuffix("_total")
            out[name] = float(line.rsplit(" ", 1)[1])
    return out


def hit_rate(before: dict, after: dict) -> dict:
    hits = after.get("hits", 0) - before.get("hits", 0)
    misses = after.get("misses", 0) - before.get("misses", 0)
    return {"cache_hits": int(hits), "cache_misses": int(misses),
            "cache_hit_rate": hits / (hits + misses) if hits + misses else float("nan")}

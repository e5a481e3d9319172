"""Which parts of an int8-dynamic bundle to keep in float: agreement with fp32 vs speed and size, per variant
(``quantize.VARIANTS``), on the bench's GPT-2-small-shaped bundle (random weights, 100 virtual tokens, 4 tasks).

For each variant: backbone weight bytes; median latency of the bench batch (8 x 64 tokens, 8 new, prompt KV on);
greedy-token agreement with the fp32 bundle on 32 rows x 32 new tokens — teacher-forced (the int8 model stepped
along the fp32 tokens, its own top-1 compared at each step) and free-running (its own tokens; one early difference
changes everything after it).

    .venv/bin/mpt-export bench --preset gpt2-small-shape   # builds build/bench/gpt2-small-shape/bundle once
    .venv/bin/python benchmarks/int8_study.py [--bundle build/bench/gpt2-small-shape/bundle] [--workdir build/int8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="build/bench/gpt2-small-shape/bundle")
    ap.add_argument("--workdir", default="build/int8")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    import mpt_export
    from mpt_export.storage.ownership import claim_workdir
    from mpt_export.export.quantize import VARIANTS, quantize_bundle

    work = claim_workdir(Path(args.workdir), "int8-study")
    src = mpt_export.load_bundle(args.bundle)
    tasks = src.tasks
    vocab = int(src.base_model["vocab_size"])
    rng = np.random.default_rng(0)
    bench_ids = rng.integers(2, vocab, (8, 64), dtype=np.int64)
    bench_tasks = [tasks[i % len(tasks)] for i in range(8)]
    eval_ids = rng.integers(2, vocab, (32, 48), dtype=np.int64)
    eval_tasks = [tasks[i % len(tasks)] for i in range(32)]
    ref = src.session().generate_ids(eval_ids, eval_tasks, max_new_tokens=32, eos_token_id=None)
    rows = []
    for variant in VARIANTS:
        out = work / variant
        if not (out / "manifest.json").is_file():
            quantize_bundle(src.path, out, scheme="int8-dynamic", variant=variant, min_agreement=0.0, force=True).close()
        b = mpt_export.load_bundle(out)
        s = b.session()
        forced = s.generate_ids(eval_ids, eval_tasks, max_new_tokens=32, eos_token_id=None, forced_tokens=ref)
        free = s.generate_ids(eval_ids, eval_tasks, max_new_tokens=32, eos_token_id=None)
        s.generate_ids(bench_ids, bench_tasks, max_new_tokens=8, eos_token_id=None)  # warm-up, task KV
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            s.generate_ids(bench_ids, bench_tasks, max_new_tokens=8, eos_token_id=None)
            times.append(time.perf_counter() - t0)
        rows.append({"variant": variant, "weights_mib": sum(b.sizes().get(k, 0) for k in ("backbone",)) / 2**20,
                     "latency_ms": statistics.median(times) * 1e3,
                     "teacher_forced": float((forced == ref).mean()), "free_running": float((free == ref).mean())})
    base = rows[0]["latency_ms"]
    print(f"{'variant':<24}{'MiB':>8}{'ms/batch':>10}{'vs all':>8}{'forced':>9}{'free':>8}")
    for r in rows:
        print(f"{r['variant']:<24}{r['weights_mib']:>8.0f}{r['latency_ms']:>10.0f}{r['latency_ms'] / base:>7.2f}x"
              f"{r['teacher_forced']:>9.1%}{r['free_running']:>8.1%}")
    (work / "study.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

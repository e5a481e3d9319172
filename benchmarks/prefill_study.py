"""A batch prefill three ways on the same bundle: the fused graph in one call for the rows whose task prompt KV is
cached (right-padded chunks, GroupQueryAttention's ``query_seqlens``: what sessions run), the fused graph row by row
(what bundles written before ``query_seqlens`` run), and the traced graph (``--graph plain``, one call). Each
measurement in a fresh process (sessions idle in one process disturb each other on a small machine), the three
interleaved per round; the task prompts cached first (a serving join's case); median and min of the rounds.

    .venv/bin/mpt-export bench --peer onnxruntime-genai --preset llama-small   # or bench --peer llama-cpp: builds it
    .venv/bin/python benchmarks/prefill_study.py [--workdir build/bench] [--rounds 5] [--precision fp32|int8|int4]
        [--batch 8] [--lens 64]   # --lens 64,30,5,...: one length per row (cycled)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WAYS = ("fused, one call", "fused, row by row", "traced, one call")


def child(job: dict) -> float:
    """One prefill of the job's batch (after a warm-up that caches the task prompts) -> seconds."""
    import mpt_export

    b = mpt_export.load_bundle(job["bundle"], verify=False)
    s = b.session(intra_op_threads=job["threads"], graph="plain" if job["way"] == WAYS[2] else "fast")
    ids, mask = np.asarray(job["ids"]), np.asarray(job["mask"])
    tasks = [b.tasks[i % len(b.tasks)] for i in range(ids.shape[0])]

    def run():
        if job["way"] != WAYS[1]:
            return s.prefill(ids, tasks, mask)
        for r in range(ids.shape[0]):  # one row per call, as a bundle written before query_seqlens runs them
            n = int(mask[r].sum())
            s.prefill(ids[r:r + 1, ids.shape[1] - n:], tasks[r:r + 1], np.ones((1, n), np.int64))

    run()  # warm-up: the graph, and every task's prompt KV cached
    t = time.perf_counter()
    run()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="build/bench")
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--precision", default="int8", choices=("fp32", "int8", "int4"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lens", default="64")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    root = Path(a.workdir) / a.preset
    bundle = root / ("bundle" if a.precision == "fp32" else f"bundle-{a.precision}")
    lens = [int(x) for x in a.lens.split(",")]
    lens = [lens[i % len(lens)] for i in range(a.batch)]
    S = max(lens)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 30000, (a.batch, S))
    mask = np.array([[0] * (S - n) + [1] * n for n in lens])
    times = {w: [] for w in WAYS}
    load = [os.getloadavg()[0]]
    for r in range(a.rounds):
        for way in WAYS:
            job = {"bundle": str(bundle), "way": way, "threads": a.threads, "ids": ids.tolist(), "mask": mask.tolist()}
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(job)], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr.strip().splitlines()[-1])
            times[way].append(float(out.stdout.strip().splitlines()[-1]))
        load.append(os.getloadavg()[0])
    print(f"{bundle}: batch {a.batch} x {lens} tokens after cached task prompts, {a.threads} threads, "
          f"{a.rounds} interleaved rounds, load {min(load):.2f}-{max(load):.2f}")
    base = statistics.median(times[WAYS[1]])
    for way, t in times.items():
        med = statistics.median(t)
        print(f"  {way:18s} median {med * 1e3:7.1f} ms  min {min(t) * 1e3:7.1f} ms  "
              f"{sum(lens) / med:7.0f} tok/s  {base / med:.2f}x row by row")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(child(json.loads(sys.argv[2])))
    else:
        main()

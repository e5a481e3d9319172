"""The fused graph against the traced one on the same bundle, and against ONNX Runtime GenAI's graph of the same base
model: decode and end-to-end tok/s at batch 1 and 8 — the bench's own measure (interleaved rounds; the prefill cancels
out of decode), the task's prompt KV cached on our side; fp32, or int8/int4 (weight-only, block 32, accuracy level
4: the bench's quantized bundles, whose fused graph is quantized with them, against GenAI's model of that precision).

``mpt-export bench --peer onnxruntime-genai`` measures the graph a CPU session runs (the fused one) against GenAI;
this adds our traced graph (``--graph plain``) beside both, through the same sessions a user opens.

    .venv/bin/mpt-export bench --peer onnxruntime-genai --preset llama-small   # builds build/bench/llama-small once
    .venv/bin/python benchmarks/fused_graph_study.py [--workdir build/bench] [--rounds 5] [--precision fp32|int8|int4]
        [--isolated]   # each side in a fresh process per round
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np


def specs_for(root: Path, preset: str, precision: str, threads: int) -> tuple[dict, int]:
    """The sides to measure (the bench's runner specs: ours on each graph, the peer where its model was built) and
    the bundle's vocabulary."""
    import mpt_export
    from mpt_export.tools.bench import PRESETS

    bundle = root / ("bundle" if precision == "fp32" else f"bundle-{precision}")
    with mpt_export.load_bundle(bundle, verify=False) as b:
        if not b.manifest.get("fast_graphs"):
            sys.exit(f"{bundle} has no fused graph ({b.manifest.get('fast_graph_skipped')}): nothing to compare")
        task, vocab = b.tasks[0], int(b.base_model["vocab_size"])
    specs = {(f"ours, {g} graph", precision): {"kind": "ours", "bundle": str(bundle), "task": task, "threads": threads,
                                               "graph": g} for g in ("fast", "plain")}
    peer = root / f"peer-{precision}"
    if (peer / "genai_config.json").is_file():
        p = PRESETS[preset]
        virtual = np.random.default_rng(1).integers(3, p.vocab, p.virtual_tokens)  # as bench --peer gives them
        specs[("onnxruntime-genai", precision)] = {"kind": "onnxruntime-genai", "model": str(peer),
                                                   "virtual": virtual.tolist(), "threads": threads}
    return specs, vocab


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="build/bench")
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8", "int4"))
    ap.add_argument("--isolated", action="store_true", help="each side in a fresh process per round (sessions of the "
                    "other sides, idle in the same process, can disturb a measurement on a small machine)")
    args = ap.parse_args(argv)
    from mpt_export.tools.bench_peer import BATCHES, measure, measure_isolated
    from mpt_export.tools.peer_runners import runner_from_spec

    specs, vocab = specs_for(Path(args.workdir) / args.preset, args.preset, args.precision, args.threads)
    before = os.getloadavg()
    if args.isolated:
        figs = measure_isolated(specs, BATCHES, 16, 32, args.rounds, vocab)
    else:
        figs = measure({k: runner_from_spec(s) for k, s in specs.items()}, BATCHES, 16, 32, args.rounds, vocab)
    print(f"{args.preset}, {args.threads} threads, {args.rounds} rounds"
          f"{', each side in its own process' if args.isolated else ''}, load {before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    for (side, q, b), f in figs.items():
        print(f"{side:22s} {q} batch {b}: decode {f['decode']['median']:6.1f} (min {f['decode']['min']:6.1f}) tok/s, "
              f"end-to-end {f['e2e']['median']:6.1f} tok/s")


if __name__ == "__main__":
    main()

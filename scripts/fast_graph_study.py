"""The fast backbone (export/fastgraph.py, run by runtime/fastkv.py) against the plain traced bundle and ONNX Runtime
GenAI's graph of the same base model: decode and end-to-end tok/s at batch 1 and 8, interleaved rounds (the bench's
own measure: the prefill cancels out of decode), the task's prompt KV cached on our two sides; fp32, or int8/int4
(weight-only, block 32, accuracy level 4 — the fast graph quantized like a bundle's, against the bench's quantized
bundle and GenAI's model of that precision).

    .venv/bin/mpt-export bench --peer onnxruntime-genai --preset llama-small   # builds build/bench/llama-small once
    .venv/bin/python scripts/fast_graph_study.py [--workdir build/bench] [--rounds 5] [--precision fp32|int8|int4]
        [--isolated]   # each side in a fresh process per round
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


class Fast:
    """The bench's runner protocol (``run(ids, new)``) over the fast graph: a cache per batch size, rows reset from
    the task's prompt KV (computed once) on every run."""

    def __init__(self, path: Path, bundle: Path, task: str, threads: int):
        import mpt_export

        self.path, self.threads = path, threads
        self.prompt = mpt_export.load_bundle(bundle, verify=False).session().task_prompt(task)
        self.caches, self.kv = {}, None

    def run(self, ids: np.ndarray, new: int) -> None:
        from mpt_export.runtime.fastkv import FastBackbone

        B, S = ids.shape
        capacity = self.prompt.shape[0] + S + max(new, 64)  # one cache (one session) for every run of this batch size
        fb = self.caches.get((B, capacity))
        if fb is None:
            fb = self.caches[(B, capacity)] = FastBackbone(self.path, B, capacity, self.threads)
        self.kv = self.kv or fb.prompt_kv(self.prompt)
        for b in range(B):
            fb.set_row(b, self.kv)
        tok = fb.run(ids, np.full(B, S)).argmax(-1)
        for _ in range(new - 1):
            tok = fb.run(tok[:, None].astype(np.int64), np.ones(B, np.int64)).argmax(-1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="build/bench")
    ap.add_argument("--preset", default="llama-small")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", default="fp32", choices=("fp32", "int8", "int4"))
    ap.add_argument("--isolated", action="store_true", help="each side in a fresh process per round (sessions of the "
                    "other sides, idle in the same process, can disturb a measurement on a small machine)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from mpt_export.export.fastgraph import write_fast_backbone
    from mpt_export.source.archs import arch_for
    from mpt_export.tools.bench import PRESETS
    from mpt_export.tools.bench_peer import measure
    from mpt_export.tools.peer_runners import Ours, Peer

    root = Path(args.workdir) / args.preset
    p = PRESETS[args.preset]
    fast = Path("build/fast-study") / args.preset / "backbone_fast.onnx"  # not in the bench's workdir (not its file)
    if not fast.is_file():
        fast.parent.mkdir(parents=True, exist_ok=True)
        model = AutoModelForCausalLM.from_pretrained(str(root / "base"))
        write_fast_backbone(model, arch_for(json.loads((root / "base" / "config.json").read_text())), fast)
        del model
    q = args.precision
    if q != "fp32":
        from mpt_export.export.weightonly import quantize_graph

        quantized = fast.with_name(f"backbone_fast_{q}.onnx")
        if not quantized.is_file():
            quantize_graph(fast, quantized, q, accuracy_level=4)  # the bundles' default (and GenAI's)
        fast = quantized
    bundle = root / ("bundle" if q == "fp32" else f"bundle-{q}")
    makers = {"plain": lambda: Ours(bundle, "task0", args.threads),
              "fast": lambda: Fast(fast, bundle, "task0", args.threads)}
    if (root / f"peer-{q}" / "genai_config.json").is_file():
        virtual = np.random.default_rng(1).integers(3, p.vocab, p.virtual_tokens)
        makers["onnxruntime-genai"] = lambda: Peer(root / f"peer-{q}", virtual, args.threads)
    if args.child:  # one side alone in this process, one round: its figures as JSON
        figs = measure({(args.child, q): makers[args.child]()}, (1, 8), 16, 32, 1, p.vocab)
        print(json.dumps({f"{k[0]}|{k[2]}": v for k, v in figs.items()}))
        return
    before = os.getloadavg()
    if args.isolated:
        figs = _isolated(list(makers), q, args, argv)
    else:
        figs = measure({(k, q): m() for k, m in makers.items()}, (1, 8), 16, 32, args.rounds, p.vocab)
    print(f"{args.preset}, {args.threads} threads, {args.rounds} rounds{', each side in its own process' if args.isolated else ''}, "
          f"load {before[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    for (side, q, b), f in figs.items():
        print(f"{side:18s} {q} batch {b}: decode {f['decode']['median']:6.1f} (min {f['decode']['min']:6.1f}) tok/s, "
              f"end-to-end {f['e2e']['median']:6.1f} tok/s")


def _isolated(sides: list[str], q: str, args, argv) -> dict:
    """Every round runs each side in a process of its own, in turn -> medians and mins as measure() gives them."""
    import statistics
    import subprocess
    import sys

    raw: dict = {}
    base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--isolated"]
    for _ in range(args.rounds):
        for side in sides:
            out = subprocess.run([sys.executable, __file__, *base, "--child", side], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            for key, fig in json.loads(out).items():
                name, b = key.split("|")
                for m, v in fig.items():
                    raw.setdefault((name, q, int(b)), {}).setdefault(m, []).append(v["median"])
    return {k: {m: {"median": statistics.median(v), "min": min(v)} for m, v in f.items()} for k, f in raw.items()}


if __name__ == "__main__":
    main()

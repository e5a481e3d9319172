"""``mpt-export bench --peer onnxruntime-genai|llama-cpp``: our bundles against ONNX Runtime GenAI's own graphs of the
same base model, or llama.cpp's own GGUF conversion of it, measured in the same run, interleaved.

Both sides get the same work: the task's virtual tokens are ordinary prompt tokens for the peer (it has no prompt
embeddings), so both decode at the same KV length. Ours starts from the task's cached prompt KV (prefill: the input
only); the peer prefills virtual tokens + input. Per precision (fp32, int8, int4 — ours weight-only, its builder's
``-p``) and batch (1, 8):

- decode tok/s: ``rows x N / (T(N + 1 new tokens) - T(1 new token))`` — the prefill cancels out;
- end-to-end tok/s: ``rows x N / T(N)``, prefill included;
- peak resident memory of loading the model and generating one batch, each side in a fresh process.

Every figure is the median (and min) over ``rounds`` rounds; in each round every (side, precision) runs once, in the
same order and each in a fresh process of its own (both batches), so the machine's load falls on both and no idle
session of another side shares the process. The load average is printed with them. The peer's graphs
are built once with its model builder (``python -m onnxruntime_genai.models.builder``) in a child process; its
MatMulNBits settings (block size, accuracy level) are read from the graph it wrote and printed beside ours.

llama.cpp (``tools/llama_cpp.py``): f32, q8_0 and q4_0 against our fp32, int8 and int4, batch 1 (``llama-bench`` runs
one sequence): decode tok/s at the same context depth (virtual tokens + input) and prefill tok/s of the input after
the virtual tokens, each round a fresh ``llama-bench`` process per figure; its peak RSS is the whole process's."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..bundle.reader import load_bundle
from ..storage.ownership import seal_workdir
from .bench import _quantized_bundle, _set_threads, _workload, PRESETS
from .bench_memory import measure_memory
from .llama_cpp import TYPES, LlamaCpp, build_gguf, find_llama_cpp, llama_bench
from .peer_runners import runner_from_spec

PEERS = ("onnxruntime-genai", "llama-cpp")
PRECISIONS = ("fp32", "int8", "int4")
BATCHES = (1, 8)


def check_peer(peer: str, llama_cpp: str | Path | None = None) -> LlamaCpp | None:
    """Raises unless ``peer`` can be measured here (llama.cpp: -> its tools, found in ``llama_cpp`` or on PATH)."""
    if peer not in PEERS:
        raise InputError(f"unknown --peer {peer!r}; the peers measured are: {', '.join(PEERS)}")
    if llama_cpp is not None and peer != "llama-cpp":
        raise InputError("--llama-cpp goes with --peer llama-cpp")
    if peer == "llama-cpp":
        return find_llama_cpp(llama_cpp)
    if importlib.util.find_spec("onnxruntime_genai") is None:
        raise MissingDependencyError("the onnxruntime-genai peer needs its package: pip install 'mpt-export[peers]' "
                                     "(or pip install onnxruntime-genai)")


def build_peer(base: Path, out: Path, precision: str, step) -> Path:
    """ONNX Runtime GenAI's graph of ``base`` in ``precision`` (built once; reused while ``out`` is complete)."""
    if (out / "genai_config.json").is_file():
        return out
    step(f"build ONNX Runtime GenAI's {precision} model (once)")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(base), "-o", str(out), "-p", precision,
           "-e", "cpu", "-c", str(out.parent / "peer-cache")]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if res.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
        raise InputError(f"ONNX Runtime GenAI's model builder failed for {precision}: {' | '.join(tail)}")

    seal_workdir(out.parent)  # its files are recorded as ours: the next run reuses them instead of refusing them
    return out


def nbits_settings(model_dir: Path) -> str:
    """The MatMulNBits settings a graph runs with: 'bits/block/accuracy level', or 'float'."""
    import onnx

    found = set()
    for f in sorted(Path(model_dir).glob("*.onnx")):
        for n in onnx.load(str(f), load_external_data=False).graph.node:
            if n.op_type == "MatMulNBits":
                a = {x.name: x.i for x in n.attribute}
                found.add(f"{a.get('bits', 4)}-bit, block {a.get('block_size')}, accuracy level "
                          f"{a.get('accuracy_level', 0)}")
    return "; ".join(sorted(found)) or "float"


def _timed(runner, ids, new: int) -> float:
    t = time.perf_counter()
    runner.run(ids, new)
    return time.perf_counter() - t


def measure(runners: dict, batches, input_len: int, new: int, rounds: int, vocab: int) -> dict:
    """Interleaved rounds over every (side, precision) runner and batch -> {(side, precision, batch): figures}."""
    rng = np.random.default_rng(0)
    inputs = {b: rng.integers(3, vocab, (b, input_len), dtype=np.int64) for b in batches}
    for r in runners.values():  # warm-up: sessions, caches, the task's prompt KV
        for b in batches:
            r.run(inputs[b], 2)
    raw = {(*k, b): {"decode": [], "e2e": [], "prefill": []} for k in runners for b in batches}
    for _ in range(rounds):
        for k, r in runners.items():
            for b in batches:
                one, full = _timed(r, inputs[b], 1), _timed(r, inputs[b], new + 1)
                raw[(*k, b)]["decode"].append(b * new / max(full - one, 1e-9))
                raw[(*k, b)]["e2e"].append(b * (new + 1) / full)
                raw[(*k, b)]["prefill"].append(b * input_len / one)  # the input after the cached prompt (+ 1 token)
    return {k: {m: {"median": statistics.median(v), "min": min(v)} for m, v in fig.items()} for k, fig in raw.items()}


def measure_isolated(specs: dict, batches, input_len: int, new: int, rounds: int, vocab: int, step=None) -> dict:
    """:func:`measure`, with every (side, precision) runner in a fresh process of its own in every round, in turn: on a
    small machine, sessions of the other sides idle in the same process (their spinning thread pools) moved one
    side's figures by up to 1.7x. A spec's own ``batches`` replace ``batches``; a llama.cpp spec runs ``llama-bench``
    (fresh processes too, batch 1). -> {(side, precision, batch): {"decode"/"e2e"/"prefill": {"median", "min"}}},
    and a llama.cpp side's ``peak_rss_mib`` (the largest seen)"""
    raw: dict = {}
    for r in range(rounds):
        for key, spec in specs.items():
            sizes = spec.get("batches", batches)
            if step:
                step(f"round {r + 1}/{rounds}: {key[0]} {key[1]}, batch {', '.join(map(str, sizes))}")
            if spec["kind"] == "llama-cpp":
                got = llama_bench(LlamaCpp(*map(Path, spec["tools"])), Path(spec["model"]), spec["threads"],
                                  spec["depth"], input_len, new)
                raw.setdefault((*key, 1), {}).setdefault("rss", []).append(got.pop("peak_rss_mib"))
                for m, v in got.items():
                    raw[(*key, 1)].setdefault(m, []).append(v)
                continue
            job = {"spec": spec, "batches": list(sizes), "input_len": input_len, "new": new, "vocab": vocab}
            res = subprocess.run([sys.executable, "-m", "mpt_export.tools.bench_peer", json.dumps(job)],
                                 capture_output=True, text=True, timeout=1800)
            if res.returncode != 0:
                tail = (res.stderr or res.stdout).strip().splitlines()[-1:]
                raise InputError(f"measuring {key[0]} {key[1]} failed: {' | '.join(tail)}")
            for b, fig in json.loads(res.stdout.strip().splitlines()[-1]).items():
                for m, v in fig.items():
                    raw.setdefault((*key, int(b)), {}).setdefault(m, []).append(v)
    return {k: {m: max(v) if m == "rss" else {"median": statistics.median(v), "min": min(v)} for m, v in fig.items()}
            for k, fig in raw.items()}


def _child(job: dict) -> dict:
    """One round of one runner in this (fresh) process -> {batch: {"decode": tok/s, "e2e": tok/s}}."""
    figs = measure({("x", "x"): runner_from_spec(job["spec"])}, job["batches"], job["input_len"], job["new"], 1,
                   job["vocab"])
    return {str(k[2]): {m: v["median"] for m, v in f.items()} for k, f in figs.items()}


def run_peer_bench(peer: str, preset: str = "llama-small", workdir: str | Path = "build/bench", rounds: int = 5,
                   threads: int | None = None, input_len: int = 64, new_tokens: int = 32, on_step=None,
                   llama_cpp: str | Path | None = None) -> dict:
    """Ours vs ``peer`` on ``preset``'s base model (see the module docstring) -> rows and the run's conditions."""
    tools = check_peer(peer, llama_cpp)
    if preset not in PRESETS or PRESETS[preset].seq2seq:
        raise InputError(f"--peer compares decoder-only models; choose one of: "
                         f"{', '.join(k for k, v in PRESETS.items() if not v.seq2seq)}")
    if rounds < 1 or input_len < 1:
        raise InputError(f"--repeats and --input-len must be >= 1, got {rounds} and {input_len}")
    step = on_step or (lambda s: None)
    threads = _set_threads(threads)
    p, base, bundle_dir, names, derived, _ = _workload(preset, workdir, None, None, 0, 0, 0, step)
    ours = {"fp32": bundle_dir, **{q: _quantized_bundle(bundle_dir, derived / f"bundle-{q}", q, step)
                                   for q in ("int8", "int4")}}
    batches = (1,) if tools else BATCHES  # llama-bench runs one sequence
    if tools:
        theirs = {q: build_gguf(tools, base, derived / "peer-llama-cpp", q, step) for q in PRECISIONS}
        peer_spec = {"kind": "llama-cpp", "tools": [str(tools.bench), str(tools.quantize), str(tools.source)],
                     "depth": p.virtual_tokens + input_len}
    else:
        theirs = {q: build_peer(base, derived / f"peer-{q}", q, step) for q in PRECISIONS}
        virtual = np.random.default_rng(1).integers(3, p.vocab, p.virtual_tokens)
        peer_spec = {"kind": peer, "virtual": virtual.tolist()}
    specs = {}
    for q in PRECISIONS:
        specs[("mpt-export", q)] = {"kind": "ours", "bundle": str(ours[q]), "task": names[0], "threads": threads}
        specs[(peer, q)] = {**peer_spec, "model": str(theirs[q]), "threads": threads}
    load_before = os.getloadavg()
    figs = measure_isolated(specs, batches, input_len, new_tokens, rounds, p.vocab, step)  # each in a fresh process
    load_after = os.getloadavg()
    step("peak memory: each model and batch in a fresh process")
    mem = peak_memory({k: v for k, v in specs.items() if v["kind"] != "llama-cpp"}, input_len, new_tokens, p.vocab,
                      batches)
    metrics = ("decode", "prefill") if tools else ("decode", "e2e")
    rows = []
    for q in PRECISIONS:
        for b in batches:
            a, t = figs[("mpt-export", q, b)], figs[(peer, q, b)]
            theirs_rss = t.pop("rss", None) or mem.get((peer, q, b))
            rows.append({"precision": q, "batch": b, "ours": a, "peer": t, "metrics": list(metrics),
                         **{f"{m}_ratio": a[m]["median"] / t[m]["median"] for m in metrics},
                         "peak_rss_mib": {"ours": mem[("mpt-export", q, b)], "peer": theirs_rss}})
    return {"peer": peer, "preset": preset, "threads": threads, "rounds": rounds, "input_len": input_len,
            "new_tokens": new_tokens, "virtual_tokens": p.virtual_tokens, "rows": rows,
            "settings": {q: {"ours": nbits_settings(ours[q]),
                             "peer": TYPES[q] + " GGUF" if tools else nbits_settings(theirs[q])} for q in PRECISIONS},
            "graphs": {q: graph_of(ours[q]) for q in PRECISIONS},
            "load_average": {"before": load_before, "after": load_after}}


def graph_of(bundle: Path) -> str:
    """Which backbone a CPU session of ``bundle`` runs (``--graph auto``)."""
    with load_bundle(bundle, verify=False) as b:
        return "fused graph" if b.info.fused else "traced graph"


def peak_memory(specs: dict, input_len: int, new: int, vocab: int, batches=BATCHES) -> dict:
    """{(side, precision, batch): peak resident MiB} of loading each runner of ``specs`` (measure_isolated's) and
    generating ``new`` tokens for one batch, each in a fresh process (bench_memory); None where the probe failed."""
    out = {}
    for key, spec in specs.items():
        for b in batches:
            ids = np.random.default_rng(0).integers(3, vocab, (b, input_len)).tolist()
            got = measure_memory({**spec, "ids": ids, "new": new})
            out[(*key, b)] = None if got is None else round(got / 2**20, 1)
    return out


if __name__ == "__main__":  # one measurement round of one runner (see measure_isolated)
    print(json.dumps(_child(json.loads(sys.argv[1]))))

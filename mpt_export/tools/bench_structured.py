"""``mpt-export bench-structured``: what an output constraint costs a decode step.

A batch of rows (mixed tasks, sampled) decodes with every row under a JSON schema, and the same batch with none, in
interleaved rounds. The constrained rounds count what the masks cost (:data:`~..runtime.constraints.MASK_STATS`:
llguidance filling each row's token mask, numpy applying it to the logits) per decode step; both report the mean
decode step (the loop's decode time over its steps). Reported: min/median over the rounds, the mask's share of an
unconstrained step at this batch, and the constraint's compile time (once per distinct constraint)."""

from __future__ import annotations

import statistics
import time

import numpy as np

from ..bundle.reader import load_bundle
from ..errors import InputError

# a schema whose string keeps rows going (a budget of new tokens, not the schema, ends most of them)
SCHEMA = {"type": "object", "properties": {
    "label": {"enum": ["entailment", "neutral", "contradiction"]},
    "evidence": {"type": "string", "maxLength": 400},
    "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["label", "evidence", "confidence"], "additionalProperties": False}


def _round(s, ids, tasks, new_tokens, seed, constraint) -> dict:
    from ..runtime.constraints import MASK_STATS

    before = dict(MASK_STATS)
    res = s.generate_detailed(ids, tasks, max_new_tokens=new_tokens, temperature=0.8, seed=seed,
                              ignore_eos=constraint is None, constraint=constraint)
    steps = int(res.lengths.max())
    d = {k: MASK_STATS[k] - before[k] for k in MASK_STATS}
    n = max(d["steps"], 1)
    return {"step_ms": 1e3 * res.timings["decode_s"] / steps, "mask_ms": 1e3 * (d["llguidance_s"] + d["apply_s"]) / n,
            "llguidance_ms": 1e3 * d["llguidance_s"] / n, "apply_ms": 1e3 * d["apply_s"] / n,
            "rows_per_step": d["rows"] / n, "tokens": int(res.lengths.sum()),
            "complete": sum(f in ("eos", "stop") for f in res.finish)}


def run_bench_structured(bundle, batch: int = 8, new_tokens: int = 32, input_len: int = 16, rounds: int = 3,
                         threads: int | None = None, on_step=None) -> dict:
    from ..runtime.constraints import Constraint, grammars_of, llguidance_module

    llguidance_module()
    step = on_step or (lambda s: None)
    if batch < 1 or new_tokens < 2 or rounds < 1 or input_len < 1:
        raise InputError("--batch, --rounds and --input-len must be >= 1, --new-tokens >= 2")
    b = load_bundle(bundle)
    s = b.session(intra_op_threads=threads)
    tasks = [b.tasks[i % len(b.tasks)] for i in range(batch)]
    ids = np.random.default_rng(0).integers(3, min(s.vocab_size, 300), (batch, input_len))
    c = Constraint.json_schema(SCHEMA)
    t0 = time.perf_counter()
    grammars_of(s).compile(c)
    compile_s = time.perf_counter() - t0
    rows = {"free": [], "json": []}
    for r in range(rounds + 1):  # round 0 warms up
        for name, constraint in (("free", None), ("json", c)):
            step(f"round {r} of {rounds}: batch {batch}, {'a JSON schema on every row' if constraint else 'free'}")
            got = _round(s, ids, tasks, new_tokens, r, constraint)
            if r:
                rows[name].append(got)
    out = {"bundle": str(bundle), "batch": batch, "new_tokens": new_tokens, "input_len": input_len,
           "rounds": rounds, "compile_ms": 1e3 * compile_s, "vocab": s.vocab_size, "threads": threads}
    for name, rs in rows.items():
        out[name] = {k: {"min": min(x[k] for x in rs), "median": statistics.median(x[k] for x in rs)}
                     for k in ("step_ms", "mask_ms", "llguidance_ms", "apply_ms")}
        out[name]["tokens"], out[name]["complete"] = rs[-1]["tokens"], rs[-1]["complete"]
    out["mask_share_of_step"] = out["json"]["mask_ms"]["median"] / out["free"]["step_ms"]["median"]
    out["llguidance_share_of_step"] = out["json"]["llguidance_ms"]["median"] / out["free"]["step_ms"]["median"]
    b.close()
    return out

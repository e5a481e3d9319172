"""Validation after export: PEFT's forward vs the bundle in ONNX Runtime, on fresh random inputs.

Cases: every task on a single unpadded row, and one left-padded mixed-task batch whose rows are compared with PEFT
on each row alone (the batch must not change a row's result). Outputs: last-position logits and every present
key/value (and, for T5, the encoder output and the cross-attention KV).

Tolerance, per output: ``max|a - b| <= atol + rtol * max|ref|``. The error of a healthy export is rounding, which
scales with the output's magnitude (T5's activations reach tens to thousands; a 7B model's logits and KV are larger
than a tiny model's), so a fixed absolute bound refuses healthy large models while any bound loose enough for them
hides real errors on small ones. The relative term follows the magnitude; ``atol`` only covers outputs that are
all near zero. Defaults per dtype and how they were chosen: ``precision.DEFAULT_TOL``. Failures are collected over
all cases, then one ValidationError names each output that missed and its numbers.
"""

from __future__ import annotations

import numpy as np

from ..errors import ValidationError
from .precision import tolerance
from .reference import peft_causal_forward, peft_seq2seq_forward, shift_right


def _diff(a: np.ndarray, ref: np.ndarray) -> tuple[float, float, float]:
    """-> (max abs diff, max abs diff / max|ref|, max|ref|)."""
    if a.shape != ref.shape:
        return float("inf"), float("inf"), 0.0
    if not a.size:
        return 0.0, 0.0, 0.0
    a64 = a.astype(np.float64)
    d = float(np.abs(a64 - ref).max())
    if not np.isfinite(a64).all():
        d = float("inf")
    scale = float(np.abs(ref).max())
    return d, d / scale if scale > 0 else d, scale


class Report:
    def __init__(self, tol: dict, seed: int, dtype=np.float32):
        self.atol, self.rtol = float(tol["atol"]), float(tol["rtol"])
        self.seed, self.dtype = seed, np.dtype(dtype)
        self.rows: list[dict] = []  # one per (case, task): logits and kv numbers

    def allowed(self, scale: float) -> float:
        return self.atol + self.rtol * scale

    def add(self, case: str, task: str, outs: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> None:
        per = {k: _diff(outs[k], ref[k]) for k in ref}
        kv_names = [k for k in per if k.startswith(("present.", "cross."))]
        worst_kv_name = max(kv_names, key=lambda k: per[k][1], default="")  # worst relative to its magnitude
        worst_kv = per[worst_kv_name] if worst_kv_name else (0.0, 0.0, 0.0)
        row = {
            "case": case, "task": task,
            "logits_max_abs": per["logits"][0], "logits_max_rel": per["logits"][1],
            "kv_max_abs": worst_kv[0], "kv_max_rel": worst_kv[1], "kv_worst_output": worst_kv_name,
            "failed": sorted(k for k, (a, _, scale) in per.items() if not a <= self.allowed(scale)),
            "_per_output": per,
        }
        if "encoder_hidden_states" in per:
            row["encoder_max_abs"], row["encoder_max_rel"] = per["encoder_hidden_states"][:2]
        self.rows.append(row)

    @property
    def ok(self) -> bool:
        return not any(r["failed"] for r in self.rows)

    def summary(self) -> dict:
        def mx(key):
            return max((r[key] for r in self.rows), default=0.0)

        out = {
            "reference": "peft forward (no cache), fp32",
            "dtype": str(self.dtype),
            "rule": "max|a-b| <= atol + rtol * max|ref| per output",
            "atol": self.atol, "rtol": self.rtol, "seed": self.seed, "passed": self.ok,
            "logits_max_abs": mx("logits_max_abs"), "logits_max_rel": mx("logits_max_rel"),
            "kv_max_abs": mx("kv_max_abs"), "kv_max_rel": mx("kv_max_rel"),
            "cases": [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.rows],
        }
        if any("encoder_max_abs" in r for r in self.rows):
            out["encoder_max_abs"], out["encoder_max_rel"] = mx("encoder_max_abs"), mx("encoder_max_rel")
        return out

    def error(self) -> ValidationError:
        lines = []
        for r in self.rows:
            for name in r["failed"]:
                a, rel, scale = r["_per_output"][name]
                lines.append(f"{name} ({r['case']}, task {r['task']}): max abs {a:.3g}, max rel {rel:.3g} "
                             f"(allowed {self.allowed(scale):.3g})")
        more = f" (+{len(lines) - 8} more)" if len(lines) > 8 else ""
        return ValidationError(
            f"exported graphs differ from PEFT beyond atol {self.atol:g} + rtol {self.rtol:g} x max|ref|: "
            + "; ".join(lines[:8]) + more
            + ". Re-export with a looser --rtol/--atol only if that difference is acceptable for your use.",
            report=self.summary(),
        )


class Cases:
    """Validation inputs and PEFT's outputs on them, computed before the bundle is opened — so the torch model can
    be freed first and the two never hold the weights at the same time."""

    def __init__(self, kind: str, seed: int):
        self.kind, self.seed = kind, seed
        self.single: list[tuple[str, dict, dict]] = []  # (task, inputs, reference)
        self.batch: dict = {}  # rows, inputs, per-row references


def _seed(seed):
    return int(np.random.SeedSequence().entropy % (2**31)) if seed is None else int(seed)


def reference_causal(peft_models: dict, task_index: dict, vocab: int, seed: int | None = None,
                     on_step=None) -> Cases:
    """PEFT's outputs for every task on a single unpadded row, and for a left-padded mixed-task batch row by row.

    ``peft_models`` maps task name -> PeftModel, ``task_index`` task name -> index inside its adapter."""
    seed = _seed(seed)
    rng = np.random.default_rng(seed)
    cases = Cases("causal", seed)
    names = list(peft_models)
    for t in names:
        if on_step:
            on_step(f"reference {t}")
        n = int(rng.integers(3, 13))
        ids = rng.integers(0, vocab, size=(1, n), dtype=np.int64)
        cases.single.append((t, {"ids": ids}, peft_causal_forward(peft_models[t], ids, task_index[t])))
    # Mixed-task, left-padded batch: each row vs PEFT on that row alone.
    if on_step:
        on_step("reference mixed batch")
    rows = [names[i % len(names)] for i in range(max(len(names), 3))]
    lens = [int(rng.integers(2, 14)) for _ in rows]
    lens[0] = max(lens)  # one row unpadded, the others padded by different amounts
    S = max(lens)
    ids = np.zeros((len(rows), S), np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    solo = []
    for b, (t, n) in enumerate(zip(rows, lens)):
        row = rng.integers(0, vocab, size=(1, n), dtype=np.int64)
        ids[b, S - n:], mask[b, S - n:] = row[0], 1
        solo.append(peft_causal_forward(peft_models[t], row, task_index[t]))
    cases.batch = {"rows": rows, "ids": ids, "mask": mask, "refs": solo}
    return cases


def compare_causal(session, cases: Cases, tol: dict | None = None, on_step=None) -> dict:
    """The bundle (``session``) on the cases' inputs vs PEFT's outputs."""
    rep = Report(tol or _default_tol(session), cases.seed, session.dtype)
    if on_step:
        on_step("validate against the reference")
    for t, inp, ref in cases.single:
        rep.add("single", t, session.row_outputs(inp["ids"], [t])[0], ref)
    rows = cases.batch["rows"]
    for b, (t, got) in enumerate(zip(rows, session.row_outputs(cases.batch["ids"], rows, cases.batch["mask"]))):
        rep.add("batch", t, got, cases.batch["refs"][b])
    if not rep.ok:
        raise rep.error()
    return rep.summary()


def reference_seq2seq(peft_models: dict, task_index: dict, vocab: int, start: int, seed: int | None = None,
                      on_step=None) -> Cases:
    """Encoder-decoder: PEFT's teacher-forced forward (with ``labels``) on single rows per task, then a padded
    mixed-task batch row by row. Compared later: encoder output, last-position logits, decoder self-attention KV
    (decoder prompt rows included) and cross-attention KV."""
    seed = _seed(seed)
    rng = np.random.default_rng(seed)
    cases = Cases("seq2seq", seed)
    names = list(peft_models)

    def sample(n, m):
        return (rng.integers(2, vocab, size=(1, n), dtype=np.int64), rng.integers(2, vocab, size=(1, m), dtype=np.int64))

    for t in names:
        if on_step:
            on_step(f"reference {t}")
        ids, labels = sample(int(rng.integers(3, 13)), int(rng.integers(2, 7)))
        cases.single.append((t, {"ids": ids, "labels": labels},
                             peft_seq2seq_forward(peft_models[t], ids, labels, task_index[t])))
    if on_step:
        on_step("reference mixed batch")
    rows = [names[i % len(names)] for i in range(max(len(names), 3))]
    lens = [int(rng.integers(2, 14)) for _ in rows]
    lens[0] = max(lens)
    m = int(rng.integers(2, 6))  # one decoder length: decoder rows differ only by their prompt rows
    S = max(lens)
    ids = np.zeros((len(rows), S), np.int64)
    mask = np.zeros((len(rows), S), np.int64)
    labels = np.zeros((len(rows), m), np.int64)
    solo = []
    for b, (t, n) in enumerate(zip(rows, lens)):
        row, lab = sample(n, m)
        ids[b, :n], mask[b, :n], labels[b] = row[0], 1, lab[0]  # right-padded, as T5 expects
        solo.append(peft_seq2seq_forward(peft_models[t], row, lab, task_index[t]))
    cases.batch = {"rows": rows, "ids": ids, "mask": mask, "labels": labels, "refs": solo, "start": start}
    return cases


def compare_seq2seq(session, cases: Cases, tol: dict | None = None, on_step=None) -> dict:
    rep = Report(tol or _default_tol(session), cases.seed, session.dtype)
    start = session.decoder_start_token_id
    if on_step:
        on_step("validate against the reference")
    for t, inp, ref in cases.single:
        rep.add("single", t, session.forward(inp["ids"], [t], decoder_input_ids=shift_right(inp["labels"], start)), ref)
    c = cases.batch
    rows = c["rows"]
    outs = session.forward(c["ids"], rows, c["mask"], decoder_input_ids=shift_right(c["labels"], start))
    for b, t in enumerate(rows):
        ekeep = outs["encoder_attention_mask"][b] == 1
        dkeep = outs["decoder_attention_mask"][b] == 1
        got = {"logits": outs["logits"][b:b + 1], "encoder_hidden_states": outs["encoder_hidden_states"][b:b + 1, ekeep]}
        for k, v in outs.items():
            if k.startswith("present."):
                got[k] = v[b:b + 1][:, :, dkeep]
            elif k.startswith("cross."):
                got[k] = v[b:b + 1][:, :, ekeep]
        rep.add("batch", t, got, c["refs"][b])
    if not rep.ok:
        raise rep.error()
    return rep.summary()


def _default_tol(session) -> dict:
    return tolerance(session.bundle.info.dtype)

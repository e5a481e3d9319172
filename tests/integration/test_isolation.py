"""Fault isolation in the serving scheduler: what belongs to one row ends that row only.

Faults are injected at the backend boundary of a real ONNX Runtime session (its graph calls): one row's logits
poisoned with NaN, a whole graph call failing whenever one row is in it, a call failing once for no row's fault.
The scheduler under test is the real one; every other request's tokens must equal what ``Session.generate`` gives it
alone on a clean session."""

from __future__ import annotations


import numpy as np
import pytest

import mpt_export
from support import serve_all, solo
from mpt_export.errors import GenerationError, NumericsError
from mpt_export.scheduler.batching import Scheduler

MARK_LEN = 30  # the faulty request's prompt: longer than any other row ever gets (prompt + text + new tokens)


@pytest.fixture(scope="module")
def clean(llama):
    return mpt_export.load_bundle(llama.bundle).session()


def _jobs(session, n=7):
    rng = np.random.default_rng(11)
    vocab = session.vocab_size
    tasks = session.tasks
    return [dict(task=tasks[i % len(tasks)], ids=rng.integers(3, vocab, int(rng.integers(2, 10))).tolist(),
                 max_new_tokens=int(rng.integers(3, 12)), temperature=0.8 if i % 3 == 2 else 0.0,
                 top_k=20 if i % 3 == 2 else 0, seed=50 + i if i % 3 == 2 else None) for i in range(n)]


def _marked(session):
    """A greedy request with a MARK_LEN-token prompt that generates at least 4 tokens alone (no early EOS)."""
    rng = np.random.default_rng(3)
    for _ in range(50):
        job = dict(task=session.tasks[0], ids=rng.integers(3, session.vocab_size, MARK_LEN).tolist(),
                   max_new_tokens=6, temperature=0.0, top_k=0, seed=None)
        if len(solo(session, job)) >= 4:
            return job
    pytest.skip("no marked prompt without an early EOS on this tiny model")


def _inject(session, fault, first_position):
    """Wrap the session's graph calls: rows whose last position is >= ``first_position`` (only the marked request
    gets there) are hit by ``fault`` — "nan" poisons their logits, "raise" fails the whole call."""
    hits = {"n": 0}

    def wrap(impl):
        def run(graph, feed, *a, **k):
            pos = feed.get("position_ids")
            bad = np.zeros(0, bool) if pos is None or graph != "backbone" else np.asarray(pos)[:, -1] >= first_position
            if bad.any() and fault == "raise":
                hits["n"] += 1
                raise RuntimeError("injected: the backend refused this batch")
            out = impl(graph, feed, *a, **k)
            if bad.any() and fault == "nan":
                hits["n"] += 1
                logits = np.array(out["logits"], copy=True)
                logits[bad] = np.nan
                out = {**out, "logits": logits}
            return out
        return run

    session._run_graph_impl = wrap(session._run_graph_impl)
    session._run_step_impl = wrap(session._run_step_impl)
    return hits


@pytest.mark.parametrize("fault", ["nan", "raise"])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_one_faulty_row_ends_alone(llama, clean, fault, where):
    jobs = _jobs(clean)
    marked = _marked(clean)
    want = [solo(clean, j) for j in jobs]
    # the marked row's last prefill position is P + MARK_LEN - 1; its second decode step runs at P + MARK_LEN + 1
    P = clean.prompt_len(marked["task"])
    first = P + MARK_LEN - 1 if where == "prefill" else P + MARK_LEN + 1
    faulty = mpt_export.load_bundle(llama.bundle).session()
    hits = _inject(faulty, fault, first)
    scheduler = Scheduler(faulty, max_batch=4, max_queue=64).start()
    try:
        order = jobs[:2] + [marked] + jobs[2:]  # the marked row shares its prefill and decode batches with others
        reqs = serve_all(scheduler, order)
    finally:
        scheduler.stop()
    bad = reqs[2]
    good = reqs[:2] + reqs[3:]
    assert hits["n"] >= 1
    assert [r.error for r in good] == [None] * len(good)
    assert [r.tokens for r in good] == want
    assert bad.finish == "error"
    assert isinstance(bad.error, NumericsError if fault == "nan" else GenerationError), bad.error
    if fault == "raise":
        assert "injected" in str(bad.error) and scheduler.retries >= 1
    if where == "decode":  # it had generated before the fault, and stopped there
        assert len(bad.tokens) >= 1


def test_a_call_that_fails_once_is_retried_and_nobody_fails(llama, clean):
    jobs = _jobs(clean)
    want = [solo(clean, j) for j in jobs]
    s = mpt_export.load_bundle(llama.bundle).session()
    failed = {"n": 0}
    step = s._run_step_impl

    def flaky(graph, feed, *a, **k):
        if failed["n"] == 0 and feed["input_ids"].shape[0] > 1:
            failed["n"] += 1
            raise RuntimeError("injected: a transient failure")
        return step(graph, feed, *a, **k)

    s._run_step_impl = flaky
    scheduler = Scheduler(s, max_batch=4, max_queue=64).start()
    try:
        reqs = serve_all(scheduler, jobs)
    finally:
        scheduler.stop()
    assert failed["n"] == 1 and scheduler.retries == 1
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert [r.tokens for r in reqs] == want


def test_extreme_sampling_numbers_do_not_touch_other_rows(clean):
    """A temperature that overflowed ``logits / t`` (1e-320), and the largest the API takes, beside greedy rows."""
    jobs = _jobs(clean, 4)
    for j in jobs:
        j.update(temperature=0.0, top_k=0, seed=None)
    odd = [dict(jobs[0], temperature=1e-320, seed=1), dict(jobs[1], temperature=2.0, top_p=1e-9, seed=2),
           dict(jobs[2], temperature=1e-5, top_k=1, seed=3)]
    scheduler = Scheduler(clean, max_batch=8).start()
    try:
        reqs = serve_all(scheduler, jobs + odd)
    finally:
        scheduler.stop()
    assert [r.error for r in reqs] == [None] * len(reqs)
    want = [solo(clean, j) for j in jobs]
    assert [r.tokens for r in reqs[:4]] == want
    # a temperature under the greedy threshold is greedy; top_p that keeps one token and top_k 1 are too
    assert reqs[4].tokens == want[0] and reqs[5].tokens == want[1] and reqs[6].tokens == want[2]


@pytest.mark.parametrize("fault", ["nan", "raise"])
@pytest.mark.parametrize("where", ["prefill", "decode"])
def test_offline_generation_isolates_rows_too(llama, clean, fault, where):
    """``Session.generate_detailed`` over a batch (what `generate --input-file` runs): the faulty row ends with its
    own error, every other row gets what the clean batch gives it — sampled, so a row retried alone must keep its
    own generator; the error raised by default carries the others' output."""
    marked = _marked(clean)
    rng = np.random.default_rng(4)
    others = [rng.integers(3, clean.vocab_size, int(rng.integers(2, 10))).tolist() for _ in range(3)]
    rows = others[:1] + [marked["ids"]] + others[1:]
    tasks = [clean.tasks[i % len(clean.tasks)] for i in range(len(rows))]
    ids = np.zeros((len(rows), MARK_LEN), np.int64)
    mask = np.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, MARK_LEN - len(r):], mask[b, MARK_LEN - len(r):] = r, 1
    settings = dict(max_new_tokens=6, temperature=0.8, top_k=20, seed=9, eos_token_id=None)
    want = clean.generate_detailed(ids, tasks, mask, **settings)
    P = clean.prompt_len(tasks[1])
    faulty = mpt_export.load_bundle(llama.bundle).session()
    hits = _inject(faulty, fault, P + MARK_LEN - 1 if where == "prefill" else P + MARK_LEN + 1)
    pieces: dict[int, str] = {}
    got = faulty.generate_detailed(ids, tasks, mask, raise_errors=False,
                                   on_text=lambda r, d: pieces.update({r: pieces.get(r, "") + d}), **settings)
    assert hits["n"] >= 1 and got.failed() == [1] and got.finish[1] == "error"
    assert all(pieces.get(b, "") == faulty.decode_row(got, b) for b in (0, 2, 3))  # streamed once, retry or not
    assert isinstance(got.errors[1], NumericsError if fault == "nan" else GenerationError), got.errors[1]
    assert f"task {tasks[1]}" in str(got.errors[1])
    for b in (0, 2, 3):
        assert got.ids[b, :got.lengths[b]].tolist() == want.ids[b, :want.lengths[b]].tolist(), b
    with pytest.raises(NumericsError if fault == "nan" else GenerationError, match="row 1: ") as e:
        faulty.generate_detailed(ids, tasks, mask, **settings)
    assert e.value.result.failed() == [1] and e.value.result.lengths[0] == want.lengths[0]

"""The continuous-batching scheduler without HTTP, on real bundles: requests of mixed tasks, prompt lengths, lengths
and sampling settings queue behind a small batch, so rows leave at different steps and newcomers take over their
slots in place, rebuild the batch, or wait while it is compacted — and every request's tokens equal what
`Session.generate` gives it alone."""

from __future__ import annotations


import numpy as np
import pytest

import mpt_export
from support import serve_all, solo
from mpt_export.scheduler.batching import Scheduler
from mpt_export.scheduler.request import QueueFull, Request
from mpt_export.runtime.sampling import SamplingParams


def _jobs(bundle, n, seed):
    rng = np.random.default_rng(seed)
    vocab = int(bundle.base_model["vocab_size"])
    tasks = bundle.tasks
    jobs = []
    for i in range(n):
        sampled = i % 3 == 2
        jobs.append(dict(task=tasks[i % len(tasks)], ids=rng.integers(3, vocab, int(rng.integers(2, 16))).tolist(),
                         max_new_tokens=int(rng.integers(1, 14)), temperature=0.8 if sampled else 0.0,
                         top_k=20 if sampled else 0, seed=100 + i if sampled else None))
    return jobs


@pytest.mark.parametrize("arch", ["llama", "t5", "llama-h64"])
def test_staggered_rows_equal_their_solo_results(make_case, arch):
    """llama-h64 runs the fused graph: its cache is left-aligned and updated in place, so joins, rebuilds and
    compactions move rows the other way."""
    case = make_case(arch, 2) if arch == "t5" else make_case(arch)
    b = mpt_export.load_bundle(case.bundle)
    s = b.session()
    assert s.graph == ("fast" if arch == "llama-h64" else "plain")
    jobs = _jobs(b, 24, seed=3)
    scheduler = Scheduler(s, max_batch=3, max_queue=64).start()
    try:
        reqs = serve_all(scheduler, jobs)
        assert [r.error for r in reqs] == [None] * len(reqs)
        eos = s.eos_token_id
        got = [r.tokens for r in reqs]
        want = [solo(s, j) for j in jobs]
        assert got == want
        assert all(r.finish == ("eos" if r.tokens[-1] == eos else "length") for r in reqs)
        # the batch really was continuous: slots were taken over in place, rebuilt for longer newcomers, compacted
        assert scheduler.joins["in_place"] > 0 and scheduler.joins["rebuild"] > 0, scheduler.joins
        decode = [st for st in scheduler.steps if st["kind"] == "decode"]
        assert max(st["batch"] for st in decode) == 3 and any(st["rows"] > st["batch"] for st in decode)
        assert scheduler.running == 0 and scheduler.idle()
    finally:
        scheduler.stop()


def test_compaction_drops_slots_nobody_takes(make_case):
    case = make_case("llama")
    b = mpt_export.load_bundle(case.bundle)
    s = b.session()
    scheduler = Scheduler(s, max_batch=4).start()
    try:
        long = dict(task="a", ids=[5, 6, 7], max_new_tokens=20, temperature=0.0, top_k=0, seed=None)
        short = [dict(long, task=t, ids=[9, 10 + i, 11], max_new_tokens=2) for i, t in enumerate("bct")]
        reqs = serve_all(scheduler, [long] + short)
        assert [r.tokens for r in reqs] == [solo(s, j) for j in [long] + short]
        if len(reqs[0].tokens) > 10:  # (no early EOS) the three short rows' slots were dropped, not decoded on
            assert scheduler.joins["compact"] >= 1
            tail = [st for st in scheduler.steps if st["kind"] == "decode"][-5:]
            assert all(st["rows"] == 1 for st in tail), tail
    finally:
        scheduler.stop()


def test_queue_bound_and_cancel(make_case):
    case = make_case("llama")
    s = mpt_export.load_bundle(case.bundle).session()
    scheduler = Scheduler(s, max_batch=1, max_queue=2)  # not started: requests stay queued
    reqs = [Request(task="a", ids=[5, 6], sampling=SamplingParams(max_new_tokens=3)) for _ in range(2)]
    for r in reqs:
        scheduler.submit(r)
    with pytest.raises(QueueFull):
        scheduler.submit(Request(task="a", ids=[5, 6], sampling=SamplingParams(max_new_tokens=3)))
    ended = []
    reqs[0].on_event = lambda k, d: ended.append((k, d.finish if k == "done" else d))
    scheduler.cancel(reqs[0].id)
    scheduler.start()
    assert scheduler.drain(60)
    scheduler.stop()
    assert ended == [("done", "cancelled")] and reqs[1].finish in ("eos", "length")

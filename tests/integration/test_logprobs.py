"""Log-probabilities of generated tokens against PEFT's own logits (log_softmax of PEFT's forward on the growing
sequence), on both backbones where a bundle has two; ``min_tokens`` and ``ignore_eos``; the scheduler records what
``Session.generate`` records."""

from __future__ import annotations

import numpy as np
import pytest

import mpt_export
from support import serve_all
from mpt_export.scheduler.batching import Scheduler
from mpt_export.errors import InputError
from mpt_export.export.reference import peft_model_for
from mpt_export.export.torchside import adapters_from_bank, load_base_model


def _peft_logprobs(pm, task_index: int, ids: list[int], generated: list[int]) -> list[np.ndarray]:
    """PEFT's log_softmax over the vocabulary before each generated token (float64)."""
    import torch

    out, seq = [], list(ids)
    with torch.no_grad():
        for t in generated:
            x = torch.tensor([seq])
            logits = pm(input_ids=x, attention_mask=torch.ones_like(x), task_ids=torch.tensor([task_index]),
                        use_cache=False).logits[0, -1].double()
            out.append(torch.log_softmax(logits, -1).numpy())
            seq.append(t)
    return out


@pytest.mark.parametrize("arch,graph", [("llama", "plain"), ("llama-h64", "fast")])  # each backbone once
def test_generated_logprobs_are_pefts_log_softmax(make_case, arch, graph):
    case = make_case(arch)
    b = mpt_export.load_bundle(case.bundle)
    s = b.session(graph=graph)
    model, _, _ = load_base_model(case.base)
    rng = np.random.default_rng(4)
    for ck, names in adapters_from_bank(b.task_bank()):
        pm = peft_model_for(model, ck)
        for i, name in enumerate(names[:2]):
            ids = rng.integers(3, s.vocab_size, 5).tolist()
            res = s.generate_detailed(np.array([ids]), [name], max_new_tokens=6, logprobs=5, eos_token_id=None)
            gen = res.ids[0].tolist()
            ref = _peft_logprobs(pm, i, ids, gen)
            assert len(res.logprobs[0]) == len(gen) == 6
            for (lp, top), want, t in zip(res.logprobs[0], ref, gen):
                assert abs(lp - want[t]) <= 1e-4, (arch, graph, name)
                best = np.argsort(-want, kind="stable")[:5]
                assert [a for a, _ in top] == best.tolist() or np.allclose(
                    [v for _, v in top], want[best], atol=1e-4)  # ties may order differently
                assert np.allclose([v for _, v in top], want[best], atol=1e-4)
                assert top[0][0] == t  # greedy: the chosen token is the most likely one
    assert s.generate_detailed(np.array([[5, 6]]), ["a"], max_new_tokens=2).logprobs is None  # only when asked


@pytest.mark.parametrize("arch,graph", [("llama", "plain"), ("llama-h64", "fast"), ("gpt2", "plain")])
def test_prompt_logprobs_are_pefts_log_softmax(make_case, arch, graph, tmp_path):
    """echo's scoring: every prompt token given the task's virtual tokens and the tokens before it, in one call of the
    scoring graph (the traced backbone with its head over every position), equal to PEFT's forward on the prompt."""
    import shutil

    import torch

    from support import edit_manifest

    case = make_case(arch)
    b = mpt_export.load_bundle(case.bundle)
    s = b.session(graph=graph)
    model, _, _ = load_base_model(case.base)
    (ck, names), = adapters_from_bank(b.task_bank())[:1]
    pm = peft_model_for(model, ck)
    ids = np.random.default_rng(6).integers(3, s.vocab_size, 7).tolist()
    got = s.prompt_logprobs(ids, names[1], k=3)
    with torch.no_grad():
        x = torch.tensor([ids])
        logits = pm(input_ids=x, attention_mask=torch.ones_like(x), task_ids=torch.tensor([1]), use_cache=False).logits
    want = torch.log_softmax(logits[0, -len(ids):].double(), -1).numpy()  # after the virtual tokens: t predicts t + 1
    assert got[0] is None and len(got) == len(ids)
    for t in range(1, len(ids)):
        assert abs(got[t][0] - want[t - 1, ids[t]]) <= 1e-4, (arch, t)
        assert np.allclose([v for _, v in got[t][1]], np.sort(want[t - 1])[::-1][:3], atol=1e-4)
    # a bundle exported before scoring graphs: one line naming the re-export
    old = tmp_path / "old"
    shutil.copytree(case.bundle, old)
    edit_manifest(old, lambda m: m.pop("scoring_graphs"), redigest=True)
    with pytest.raises(InputError, match="has no scoring graph .* export it again"):
        mpt_export.load_bundle(old).session(graph="plain").prompt_logprobs(ids, names[0])


def test_min_tokens_and_ignore_eos(llama):
    s = mpt_export.load_bundle(llama.bundle).session()
    ids = np.array([[7, 8, 9]])
    first = int(s.generate_ids(ids, ["b"], max_new_tokens=1, eos_token_id=None)[0, 0])
    # with that token as EOS the row ends at once; min_tokens keeps EOS out of its first tokens; ignore_eos runs on
    r = s.generate_detailed(ids, ["b"], max_new_tokens=8, eos_token_id=first)
    assert r.lengths[0] == 1 and r.finish == ["eos"]
    r = s.generate_detailed(ids, ["b"], max_new_tokens=8, eos_token_id=first, min_tokens=3, logprobs=1)
    assert r.lengths[0] >= 3 and first not in r.ids[0, :3].tolist()
    assert r.logprobs[0][0][1][0][0] == first  # the logprobs are the model's: EOS was its most likely first token
    r = s.generate_detailed(ids, ["b"], max_new_tokens=8, eos_token_id=first, ignore_eos=True)
    assert r.lengths[0] == 8 and r.ids[0, 0] == first and r.finish == ["length"]
    for kw, word in ((dict(logprobs=21), "logprobs must be an integer from 0 to 20"),
                     (dict(min_tokens=9), "min_tokens must be an integer from 0 to max_new_tokens"),
                     (dict(ignore_eos="yes"), "ignore_eos must be true or false")):
        with pytest.raises(InputError, match=word):
            s.generate_detailed(ids, ["b"], max_new_tokens=8, **kw)


def test_the_engine_records_what_generate_records(make_case):
    """Mixed tasks joining a running batch on the fused graph: each request's log-probabilities are its solo run's."""
    s = mpt_export.load_bundle(make_case("llama-h64").bundle).session()
    jobs = [dict(task="abct"[i % 4], ids=[5 + i, 9, 11 + 2 * i][: 1 + i % 3], max_new_tokens=3 + i % 4,
                 temperature=0.0, top_k=0, seed=None, logprobs=3) for i in range(8)]
    scheduler = Scheduler(s, max_batch=3, max_queue=16).start()
    try:
        reqs = serve_all(scheduler, jobs)
    finally:
        scheduler.stop()
    for r, j in zip(reqs, jobs):
        solo = s.generate_detailed(np.array([j["ids"]]), [j["task"]], max_new_tokens=j["max_new_tokens"], logprobs=3)
        assert r.tokens == solo.ids[0, : solo.lengths[0]].tolist()
        assert len(r.token_logprobs) == len(r.tokens)
        for (a, ta), (b, tb) in zip(r.token_logprobs, solo.logprobs[0]):
            assert abs(a - b) <= 1e-5 and [x for x, _ in ta] == [x for x, _ in tb]

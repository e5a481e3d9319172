"""`mpt-export eval` on the user's own data: multiple-choice accuracy and log-likelihoods equal to what PEFT gives on
the same token ids, generation exact match, the comparison with PEFT (no difference beyond float noise) and with a
quantized copy, and a data file it cannot read refused with its file:line."""

from __future__ import annotations

import json

import numpy as np

import mpt_export
from support import assert_clean_failure, cli

WORDS = ["the", "movie", "was", "great", "plot", "station", "bridge", "premise", "task", "backbone", "a", "old"]


def _data(path, rng):
    rows = []
    for i in range(10):
        prompt = " ".join(rng.choice(WORDS, int(rng.integers(2, 5))))
        if i % 2:
            rows.append({"task": "act"[(i // 2) % 3], "prompt": prompt, "target": " ".join(rng.choice(WORDS, 2)),
                         "stop": "."})
        else:
            rows.append({"prompt": prompt, "choices": [" ".join(rng.choice(WORDS, 2)) for _ in range(3)],
                         "answer": int(rng.integers(0, 3))})  # no task: --task
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_eval_against_peft_and_a_quantized_copy(llama, tmp_path):
    import torch

    from mpt_export.export.quantize import quantize_bundle
    from mpt_export.export.reference import peft_model_for
    from mpt_export.export.torchside import adapters_from_bank, load_base_model

    data = tmp_path / "data.jsonl"
    rows = _data(data, np.random.default_rng(2))
    res = cli("eval", llama.bundle, "--data", data, "--task", "b", "--base-model", llama.base, "--json")
    assert res.returncode == 0, res.stderr
    figs = json.loads(res.stdout)["tasks"]
    assert set(figs) == {"a", "b", "c", "t"} and sum(f["examples"] for f in figs.values()) == len(rows)
    for f in figs.values():
        assert f["max_logprob_diff"] < 1e-4
        assert f["teacher_forced_agreement"] in (None, 1.0) and f["free_running_agreement"] in (None, 1.0)
    # task b's multiple choice, recomputed with PEFT on the same token ids
    b = mpt_export.load_bundle(llama.bundle)
    tok = b.session().tokenizer
    model, _, _ = load_base_model(llama.base)
    (ck, names), = [(c, n) for c, n in adapters_from_bank(b.task_bank()) if "b" in n]
    pm = peft_model_for(model, ck)
    right, lls = [], []
    for r in rows:
        if "choices" not in r:
            continue
        ctx = tok.encode(r["prompt"])
        scores = []
        for c in r["choices"]:
            ids = tok.encode(r["prompt"] + " " + c)
            x = torch.tensor([ids])
            with torch.no_grad():
                lp = torch.log_softmax(pm(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False,
                                          task_ids=torch.tensor([names.index("b")])).logits[0, -len(ids):].double(), -1)
            scores.append(float(sum(lp[k - 1, ids[k]] for k in range(len(ctx), len(ids)))))
        right.append(int(np.argmax(scores)) == r["answer"])
        lls.append(scores[r["answer"]])
    assert figs["b"]["accuracy"] == np.mean(right)

    assert abs(figs["b"]["mean_loglik"] - np.mean(lls)) < 1e-4  # b has choices only: its right answers
    assert figs["a"]["accuracy"] is None and figs["a"]["exact_match"] is not None
    # against a quantized copy: the same figures computed, differences and agreement as they are
    q = quantize_bundle(llama.bundle, tmp_path / "int8", scheme="int8", min_agreement=0.0)
    res = cli("eval", q.path, "--data", data, "--task", "b", "--against", llama.bundle, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["against"] == str(llama.bundle) and set(out["tasks"]) == set(figs)
    assert all(0 < f["max_logprob_diff"] < 5 and 0 <= f["teacher_forced_agreement"] <= 1
               for f in out["tasks"].values() if f["teacher_forced_agreement"] is not None)
    table = cli("eval", q.path, "--data", data, "--task", "b", "--against", llama.bundle)
    assert table.returncode == 0 and "against" in table.stdout  # the table, titled with the reference
    # quantize judged on the same prompts instead of random ids (every line naming its task)
    tagged = tmp_path / "tagged.jsonl"
    tagged.write_text("".join(json.dumps({"task": "b", **r}) + "\n" for r in rows))
    res = cli("quantize", llama.bundle, "--out", tmp_path / "q8", "--quantize", "int8", "--eval-data", tagged,
              "--min-agreement", "0")
    assert res.returncode == 0, res.stderr
    assert f"on {len(rows)} eval-data prompts" in " ".join(res.stdout.split())
    rep = mpt_export.load_bundle(tmp_path / "q8").manifest["quantization"]["report"]
    assert rep["on"] == f"{len(rows)} eval-data prompts" and rep["tokens_compared"] == 16 * len(rows)
    assert_clean_failure(cli("quantize", llama.bundle, "--out", tmp_path / "q4", "--quantize", "int4", "--eval-data",
                             data), "data.jsonl:1", "no \"task\"")
    # what it refuses, with the file and line
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n{not json\n")
    assert_clean_failure(cli("eval", llama.bundle, "--data", bad), "bad.jsonl:1", "no \"task\" and no --task")
    assert_clean_failure(cli("eval", llama.bundle, "--data", bad, "--task", "a"), "bad.jsonl:2: not valid JSON")
    bad.write_text('{"prompt": "x", "choices": ["a"], "answer": 0}\n')
    assert_clean_failure(cli("eval", llama.bundle, "--data", bad, "--task", "zz"), "bad.jsonl:1: unknown task 'zz'")
    assert_clean_failure(cli("eval", llama.bundle, "--data", bad, "--task", "a"), "bad.jsonl:1", "2 or more")
    assert_clean_failure(cli("eval", llama.bundle, "--data", tmp_path / "none.jsonl"), "cannot read")


def test_a_task_that_scores_nan_fails_alone_with_its_line(llama, tmp_path):
    """NaN in any score is that task's error (file:line, exit 1), never an accuracy beside a NaN mean; the other
    tasks' figures are still given, and --json stays JSON."""
    import shutil

    from support import poison_token

    tok = mpt_export.load_bundle(llama.bundle).session().tokenizer
    ok_ids, bad_ids = tok.encode("the movie"), tok.encode("the station was")
    bad_token = next(t for t in bad_ids if t not in ok_ids + tok.encode(" was great") + tok.encode(" the plot"))
    b = tmp_path / "b"
    shutil.copytree(llama.bundle, b)
    poison_token(b, bad_token)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"task": "a", "prompt": "the movie", "choices": ["was great", "the plot"], "answer": 0})
                    + "\n" + json.dumps({"task": "b", "prompt": "the station was", "choices": ["was great", "the plot"],
                                         "answer": 1}) + "\n")
    res = cli("eval", b, "--data", data, "--json")
    assert_clean_failure(res, "1 of 2 task(s) failed", f"{data}:2: task 'b' gave NaN or Inf log-likelihoods")
    figs = json.loads(res.stdout)["tasks"]  # strict JSON: a bare NaN would not parse
    assert "error" in figs["b"] and figs["a"]["accuracy"] is not None and np.isfinite(figs["a"]["mean_loglik"])
    clean = json.loads(cli("eval", llama.bundle, "--data", data, "--json").stdout)["tasks"]
    assert figs["a"] == clean["a"]
    table = cli("eval", b, "--data", data)
    assert table.returncode == 1 and "failed" in table.stdout


def test_eval_errors_name_file_and_line(llama, tmp_path):
    """A prompt that is not valid Unicode and an input too long for the model are refused before anything runs,
    naming the file and line."""
    data = tmp_path / "d.jsonl"
    ok = json.dumps({"task": "a", "prompt": "the movie", "target": "was"})
    for bad, says in ((json.dumps({"task": "a", "prompt": "hi \udc80", "target": "x"}), '"prompt" is not valid Unicode'),
                      (json.dumps({"task": "a", "prompt": "x", "choices": ["ok", "\ud800"], "answer": 0}),
                       '"choices" is not valid Unicode'),
                      (json.dumps({"task": "a", "prompt": "the movie " * 200, "choices": ["a", "b"], "answer": 0}),
                       "is too long"),
                      (json.dumps({"task": "a", "prompt": "the movie " * 4, "target": "was"}), "do not fit")):
        data.write_text(ok + "\n" + bad + "\n")
        assert_clean_failure(cli("eval", llama.bundle, "--data", data, "--max-new-tokens", "40"), f"{data}:2:", says)

"""EleutherAI's lm-evaluation-harness against `mpt-export serve`, as a user runs it: a local task (YAML + JSONL) of
20 multiple-choice questions scored by log-likelihood and 20 `generate_until` prompts, `lm_eval --model
local-completions` with the task as the model name and the bundle's tokenizer, batch size 4. Its per-sample
log-likelihoods are compared with PEFT's on the same token ids (lm-eval's own split of context and continuation),
its accuracy with the accuracy those give, its generations with the library's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="needs lm-eval[api] (the test extra)")
pytest.importorskip("starlette")

from servers import server  # noqa: E402

N = 20  # the samples per task the harness is run on


def _data(root: Path, tok, rng) -> tuple[Path, list[dict], list[dict]]:
    words = ["the", "movie", "was", "good", "bad", "plot", "great", "it", "and", "not", "a", "film", "story", "fun"]
    mc = [{"question": " ".join(rng.choice(words, int(rng.integers(3, 7)))) + ":",
           "choices": [" ".join(rng.choice(words, int(rng.integers(1, 3)))) for _ in range(4)],
           "answer": int(rng.integers(0, 4))} for _ in range(N)]
    gen = [{"prompt": " ".join(rng.choice(words, int(rng.integers(2, 6)))), "target": "x"} for _ in range(N)]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    (root / "gen.jsonl").write_text("".join(json.dumps(d) + "\n" for d in gen))
    common = "dataset_path: json\ntest_split: test\n"
    (root / "mpt_mc.yaml").write_text(
        f"task: mpt_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
    (root / "mpt_gen.yaml").write_text(
        f"task: mpt_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: \"{{prompt}}\"\ndoc_to_target: \"{{target}}\"\n"
        "generation_kwargs:\n  until: [\"\\n\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")
    return root, mc, gen


def _encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's split (lm_eval/api/model.py): trailing spaces of the context go to the continuation,
    the whole is encoded once and the context's tokens cut off its front."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole = tok(context + continuation, add_special_tokens=False).input_ids
    ctx = tok(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx):]


def _peft_loglik(pm, task_index: int, ctx: list[int], cont: list[int]) -> float:
    import torch

    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = pm(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.tensor([task_index]),
                    use_cache=False).logits[0, -ids.shape[1]:].double()
    lp = torch.log_softmax(logits, -1)
    return float(sum(lp[len(ctx) + i - 1, t] for i, t in enumerate(cont)))


def test_lm_evaluation_harness_scores_a_served_task_as_peft_does(served, offline, tmp_path):
    from transformers import AutoTokenizer

    from mpt_export.export.reference import peft_model_for
    from mpt_export.export.torchside import adapters_from_bank, load_base_model
    import mpt_export

    bundle = mpt_export.load_bundle(served["bundle"])
    tok_dir = Path(served["bundle"]) / "tokenizer"  # what a user passes lm_eval: the bundle's tokenizer folder
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tasks_dir, mc, gen = _data(tmp_path, tok, np.random.default_rng(3))
    out = tmp_path / "out"
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with server(served["bundle"], "--max-batch", "8") as s:
        res = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args",
             f"model=mnli,base_url={s.url}/v1/completions,tokenizer_backend=huggingface,"
             f"tokenizer={tok_dir},num_concurrent=1,max_retries=1",
             "--tasks", "mpt_mc,mpt_gen", "--include_path", str(tasks_dir), "--batch_size", "4", "--log_samples",
             "--output_path", str(out)], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        assert s.stop() == 0
    results = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {t: [json.loads(x) for x in next(out.rglob(f"samples_{t}_*.jsonl")).read_text().splitlines()]
               for t in ("mpt_mc", "mpt_gen")}
    assert len(samples["mpt_mc"]) == N and len(samples["mpt_gen"]) == N
    # every choice's log-likelihood against PEFT on lm-eval's own token ids
    model, _, _ = load_base_model(served["base"])
    (ck, names), = [(c, n) for c, n in adapters_from_bank(bundle.task_bank()) if "mnli" in n]
    pm = peft_model_for(model, ck)
    correct = 0
    for smp in sorted(samples["mpt_mc"], key=lambda x: x["doc_id"]):
        doc = mc[smp["doc_id"]]
        args = [smp["arguments"][f"gen_args_{j}"] for j in range(len(doc["choices"]))]  # (context, " choice")
        want = [_peft_loglik(pm, names.index("mnli"), *_encode_pair(tok, a["arg_0"], a["arg_1"])) for a in args]
        got = [float(r[0][0]) for r in smp["resps"]]
        assert np.allclose(got, want, atol=1e-3), (smp["doc_id"], got, want)
        correct += int(np.argmax(want) == doc["answer"])
    assert results["results"]["mpt_mc"]["acc,none"] == pytest.approx(correct / N)
    # generations: what the library generates for the same prompt (greedy, stopped as lm-eval asked)
    for smp in samples["mpt_gen"]:
        prompt = gen[smp["doc_id"]]["prompt"]
        ids = tok(prompt, add_special_tokens=False).input_ids
        want = offline.session.generate_detailed(np.array([ids]), ["mnli"], max_new_tokens=6, stop=["\n\n"])
        assert smp["resps"][0][0] == offline.session.decode_row(want, 0, ["\n\n"]), smp["doc_id"]

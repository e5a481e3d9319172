"""The server, for real: `mpt-export serve` on 127.0.0.1 (a free port), driven by the official `openai` client and
httpx; results compared with the library's own offline generation. This module: other models and drivers — a base
model with a chat template (chat completions) and a T5 bundle (bench-serve: test_bench.py)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import mpt_export  # noqa: E402
from servers import server  # noqa: E402


def test_chat_completions_with_a_template(tmp_path, served):
    """A base model with a chat template: export copies it, the server renders it (sandboxed) and generates."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(served["base"], base)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}")
    (base / "tokenizer_config.json").write_text(json.dumps(cfg))
    b = mpt_export.export_bundle(base, [f"sst2,mnli,qnli={served['root'] / 'src'}"], tmp_path / "b", validate=False)
    s_off = b.session()
    with server(tmp_path / "b") as s:
        c = s.client()
        msgs = [{"role": "user", "content": "the movie was"}]
        r = c.chat.completions.create(model="mnli", messages=msgs, max_tokens=6, temperature=0)
        ids = s_off.tokenizer.encode("user: the movie was\nassistant:", add_special_tokens=False)
        ref = s_off.generate_detailed(np.array([ids]), ["mnli"], max_new_tokens=6)
        assert r.choices[0].message.content == s_off.decode_row(ref, 0) and r.choices[0].message.role == "assistant"
        chunks = list(c.chat.completions.create(model="mnli", messages=msgs, max_tokens=6, temperature=0,
                                                stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == r.choices[0].message.content
        # log-probabilities in the chat schema, from the logits that chose each token (the session's, PEFT-checked
        # in tests/integration/test_logprobs.py), streamed chunks carrying theirs
        lp = s_off.generate_detailed(np.array([ids]), ["mnli"], max_new_tokens=6, logprobs=3).logprobs[0]
        r = c.chat.completions.create(model="mnli", messages=msgs, max_tokens=6, temperature=0, logprobs=True,
                                      top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert [x.token for x in content] == [s_off.tokenizer.token_text(t) for t in ref.ids[0, : ref.lengths[0]]]
        assert all(abs(x.logprob - e[0]) < 1e-6 and len(x.top_logprobs) == 3 and x.bytes == list(x.token.encode())
                   for x, e in zip(content, lp))
        chunks = list(c.chat.completions.create(model="mnli", messages=msgs, max_tokens=6, temperature=0,
                                                stream=True, logprobs=True, top_logprobs=2))
        streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.content]
        assert [x.logprob for x in streamed] == [x.logprob for x in content]
        # structured outputs through the chat template: the reply is what the constraint allows
        r = c.chat.completions.create(model="mnli", messages=msgs, max_tokens=24, temperature=1.0, seed=3,
                                      response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
                                          "type": "object", "properties": {"ok": {"type": "boolean"}},
                                          "required": ["ok"], "additionalProperties": False}}})
        assert json.loads(r.choices[0].message.content) in ({"ok": True}, {"ok": False})
        r = c.chat.completions.create(model="qnli", messages=msgs, max_tokens=8, temperature=1.0, seed=3,
                                      extra_body={"structured_outputs": {"choice": ["entailment", "not_entailment"]}})
        assert r.choices[0].message.content in ("entailment", "not_entailment")
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "mnli", "messages": msgs, "top_logprobs": 2})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_logprobs"
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "mnli", "messages": "hi"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert s.stop() == 0


def _mixed_tasks_as_the_session(client, sess) -> list[str]:
    """Four concurrent greedy completions of different tasks; each must be what ``sess`` generates alone. -> texts"""
    jobs = [("a", "the movie", 6), ("t", "the plot was", 9), ("b", "one", 4), ("c", "a frozen backbone", 7)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=j[2],
                                                                temperature=0).choices[0].text, jobs))
    assert got == [sess.generate([p], [t], max_new_tokens=n)[0] for t, p, n in jobs]
    return got


def test_a_t5_bundle_is_served(make_case):
    case = make_case("t5", 2)
    sess = mpt_export.load_bundle(case.bundle).session()
    with server(case.bundle) as s:
        c = s.client()
        got = _mixed_tasks_as_the_session(c, sess)
        text = "".join(ch.choices[0].text for ch in c.completions.create(model="t", prompt="the plot was",
                                                                          max_tokens=9, temperature=0, stream=True))
        assert text == got[1]
        assert s.stop() == 0


def test_a_weight_only_int8_bundle_is_served(llama, tmp_path):
    """`export --quantize` / `quantize` bundles serve like any other: mixed tasks in shared batches, each request
    what the bundle's own session generates."""
    from mpt_export.export.quantize import quantize_bundle

    q = quantize_bundle(llama.bundle, tmp_path / "int8", scheme="int8", min_agreement=0.0)
    sess = q.session()
    with server(q.path, "--max-batch", "4") as s:
        _mixed_tasks_as_the_session(s.client(), sess)
        assert s.stop() == 0


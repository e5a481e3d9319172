"""The server, for real: `mpt-export serve` on 127.0.0.1 (a free port), driven by the official `openai` client and
httpx; results compared with the library's own offline generation. This module: the OpenAI API on one server shared
by its checks — models, completions equal offline, streaming and stop strings, concurrent mixed tasks in shared
decode steps, a request joining the running batch, OpenAI-shaped errors, one request never failing another, a
disconnect freeing its row."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from servers import AUTH, KEY, PROMPTS, server  # noqa: E402


@pytest.fixture(scope="module")
def srv(served):
    with server(served["bundle"], "--api-key", KEY, "--max-batch", "16") as s:
        yield s
        assert s.stop() == 0


def test_models_and_offline_equality(srv, offline):
    c = srv.client()
    models = c.models.list().data
    assert [m.id for m in models] == ["sst2", "mnli", "qnli", "rte"]
    assert all(m.object == "model" and m.owned_by == "mpt-export" for m in models)
    assert httpx.get(srv.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0][
        "parent"] == "bundle"
    for task, prompt in zip(["sst2", "mnli", "qnli", "rte"], PROMPTS):
        r = c.completions.create(model=task, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == offline(task, prompt, 12), task
        assert r.model == task and r.object == "text_completion"
        n_prompt = len(offline.session.tokenizer.encode(prompt))
        assert r.usage.prompt_tokens == n_prompt and r.usage.total_tokens == n_prompt + r.usage.completion_tokens
        assert r.usage.completion_tokens == (12 if r.choices[0].finish_reason == "length" else r.usage.completion_tokens)


def test_stream_equals_non_stream_and_stop(srv, offline):
    c = srv.client()
    for task, prompt in [("mnli", PROMPTS[1]), ("rte", PROMPTS[3])]:
        full = c.completions.create(model=task, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
        chunks = list(c.completions.create(model=task, prompt=prompt, max_tokens=20, temperature=0, stream=True,
                                           stream_options={"include_usage": True}))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full
        assert chunks[-1].usage.completion_tokens >= 1 and [ch for ch in chunks if ch.choices][-1].choices[
            0].finish_reason in ("stop", "length")
        stop = full[3:5] if len(full) > 6 else None
        if stop:
            r = c.completions.create(model=task, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
            assert r.choices[0].text == offline(task, prompt, 20, stop=[stop]) == full[: full.index(stop)]
            assert r.choices[0].finish_reason == "stop"
    # a prompt list: one choice per prompt, each its offline result; sampling with a seed equals the library's
    r = c.completions.create(model="qnli", prompt=PROMPTS[:3], max_tokens=6, temperature=0)
    assert [ch.text for ch in r.choices] == [offline("qnli", p, 6) for p in PROMPTS[:3]]
    r = c.completions.create(model="sst2", prompt=PROMPTS[0], max_tokens=8, temperature=0.9, top_p=0.9, seed=5)
    assert r.choices[0].text == offline("sst2", PROMPTS[0], 8, temperature=0.9, top_p=0.9, seed=5)
    # a body that leaves the settings out gets the server's one defaults object (OpenAI's: temperature 1, 16 tokens):
    # a seeded prompt list over HTTP equals Session.generate given that same object, row for row
    from mpt_export.runtime.sampling import SamplingParams
    from mpt_export.serving.http.protocol import HTTP_DEFAULTS

    r = c.completions.create(model="qnli", prompt=PROMPTS[:3], seed=11)
    want = offline.session.generate(PROMPTS[:3], "qnli", sampling=SamplingParams.of(HTTP_DEFAULTS, seed=11))
    assert [ch.text for ch in r.choices] == want
    assert want != offline.session.generate(PROMPTS[:3], "qnli", sampling=SamplingParams(seed=11))  # not greedy


def test_logprobs_min_tokens_and_ignore_eos(srv, offline):
    """OpenAI's legacy logprobs shape (what lm-evaluation-harness reads) from the official client: one entry per
    generated token, EOS included, from the logits that chose it (the session's; PEFT-checked in
    tests/integration/test_logprobs.py), streamed chunks carrying theirs; vLLM's min_tokens and ignore_eos."""
    import numpy as np

    c, s = srv.client(), offline.session
    ids = s.tokenizer.encode(PROMPTS[2])
    ref = s.generate_detailed(np.array([ids]), ["qnli"], max_new_tokens=10, logprobs=5)
    toks = ref.ids[0, : ref.lengths[0]].tolist()
    r = c.completions.create(model="qnli", prompt=ids, max_tokens=10, temperature=0, logprobs=5)
    lp = r.choices[0].logprobs
    assert lp.tokens == [s.tokenizer.token_text(t) for t in toks] and len(lp.token_logprobs) == len(toks)
    assert all(abs(a - e[0]) < 1e-6 for a, e in zip(lp.token_logprobs, ref.logprobs[0]))
    assert all(len(top) <= 5 and max(top.values()) == pytest.approx(e[1][0][1]) for top, e in zip(
        lp.top_logprobs, ref.logprobs[0]))
    text = r.choices[0].text
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset) and lp.text_offset[-1] <= len(text)
    chunks = list(c.completions.create(model="qnli", prompt=ids, max_tokens=10, temperature=0, logprobs=2,
                                       stream=True))
    streamed = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    r = c.completions.create(model="qnli", prompt=ids, max_tokens=12, temperature=0,
                             extra_body={"ignore_eos": True, "min_tokens": 12})
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    want = s.generate_detailed(np.array([ids]), ["qnli"], max_new_tokens=12, ignore_eos=True, min_tokens=12)
    assert r.choices[0].text == s.decode_row(want, 0)
    # echo, as lm-evaluation-harness asks for it: token-id prompts, logprobs 1, max_tokens 0 and 1
    batch = [s.tokenizer.encode(p) for p in PROMPTS[:4]]
    for max_tokens in (0, 1):
        r = c.completions.create(model="mnli", prompt=batch, max_tokens=max_tokens, temperature=0, logprobs=1,
                                 echo=True)
        for ch, ids in zip(r.choices, batch):
            lp, want = ch.logprobs, s.prompt_logprobs(ids, "mnli", 1)
            assert len(lp.token_logprobs) == len(ids) + max_tokens and lp.token_logprobs[0] is None
            assert all(abs(a - w[0]) < 1e-6 for a, w in zip(lp.token_logprobs[1:len(ids)], want[1:]))
            assert lp.top_logprobs[0] is None and all(len(t) == 1 for t in lp.top_logprobs[1:])
            assert ch.text.startswith(s.tokenizer.decode(ids)) and lp.text_offset[0] == 0
    for body, param in (({"logprobs": 6}, "logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"min_tokens": -1}, "min_tokens"), ({"ignore_eos": "no"}, "ignore_eos"),
                        ({"echo": True, "stream": True}, "echo"), ({"max_tokens": 0}, "max_tokens")):
        bad = httpx.post(srv.url + "/v1/completions", headers=AUTH,
                         json={"model": "qnli", "prompt": "x", "max_tokens": 2, **body})  # (max_tokens 0: echo only)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (body, bad.text)


def test_concurrent_mixed_tasks_equal_their_solo_results(srv, offline):
    c = srv.client()
    jobs = [(["sst2", "mnli", "qnli", "rte"][i % 4], PROMPTS[i % len(PROMPTS)], 8 + i) for i in range(12)]
    with ThreadPoolExecutor(12) as ex:
        got = list(ex.map(lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=j[2],
                                                         temperature=0).choices[0].text, jobs))
    assert got == [offline(t, p, n) for t, p, n in jobs]
    mixed = [s for s in srv.steps()["steps"] if s["kind"] == "decode" and s["batch"] > 1]
    assert mixed, "concurrent requests never shared a decode step"


def test_a_request_joins_the_running_batch(srv, offline):
    """A request sent while another is decoding runs in the same decode steps before the first one finishes."""
    c = srv.client()
    long_prompt, long_n = "the movie was", 300
    first = offline("sst2", long_prompt, long_n)
    since = srv.steps()["step_count"]
    stream = c.completions.create(model="sst2", prompt=long_prompt, max_tokens=long_n, temperature=0, stream=True)
    it = iter(stream)
    head = [next(it).choices[0].text for _ in range(3)]  # the long request is decoding now
    second = c.completions.create(model="rte", prompt=PROMPTS[3], max_tokens=5, temperature=0)
    rest_chunks = [ch.choices[0].text for ch in it]
    assert len(rest_chunks) > 10  # completion order: the short request finished while the long one still streamed
    assert "".join(head) + "".join(rest_chunks) == first and second.choices[0].text == offline("rte", PROMPTS[3], 5)
    steps = [s for s in srv.steps()["steps"] if s["step"] > since]
    ids = {s["requests"][0] for s in steps if s["kind"] == "prefill"}
    shared = [s for s in steps if s["kind"] == "decode" and len(s["requests"]) == 2]
    assert len(ids) == 2 and shared, steps[:5]
    last_shared = max(s["step"] for s in shared)
    long_id = next(s["requests"][0] for s in steps if s["kind"] == "prefill")
    assert any(s["step"] > last_shared and long_id in s["requests"] for s in steps)  # the first went on after


def test_errors_are_openai_shaped(srv):
    c = srv.client()
    with pytest.raises(openai.AuthenticationError):
        srv.client(key="wrong").models.list()
    r = httpx.post(srv.url + "/v1/completions", json={"model": "sst2", "prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as e:
        c.completions.create(model="nope", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and "sst2" in e.value.body["message"]
    bad = [({"model": "sst2", "prompt": "x", "n": 2}, "n"),
           ({"model": "sst2", "prompt": "x", "temperature": -1}, "temperature"),
           ({"model": "sst2", "prompt": "x", "top_p": 0}, "top_p"),
           ({"model": "sst2", "prompt": "x", "max_tokens": 0}, "max_tokens"),
           ({"model": "sst2", "prompt": "x", "max_tokens": 10_000}, "max_tokens"),
           ({"model": "sst2", "prompt": " ".join(["the movie was"] * 300), "max_tokens": 4}, "prompt"),
           ({"model": "sst2", "prompt": "x", "stop": [""]}, "stop"),
           ({"model": "sst2", "prompt": 5}, "prompt"),
           ({"model": "sst2", "prompt": "x", "suffix": "y"}, "suffix"),
           ({"prompt": "x"}, "model")]
    h = {"Authorization": f"Bearer {KEY}"}
    for body, param in bad:
        r = httpx.post(srv.url + "/v1/completions", json=body, headers=h)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], (body, err)
    hj = {**h, "Content-Type": "application/json"}
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers=hj)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", content=b"x" * (2 << 20), headers=hj)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "sst2", "messages": [{"role": "user",
                                                                                          "content": "hi"}]}, headers=h)
    assert r.status_code == 400 and r.json()["error"]["code"] == "chat_template_missing"
    assert httpx.get(srv.url + "/nowhere").json()["error"]["code"] == "not_found"
    assert httpx.get(srv.url + "/metrics").status_code == 401  # its labels name the tasks
    metrics = httpx.get(srv.url + "/metrics", headers=h).text
    for name in ("mpt_export_requests_total", "mpt_export_queue_depth", "mpt_export_running_batch_size",
                 "mpt_export_generated_tokens_total", "mpt_export_time_to_first_token_seconds_bucket",
                 "mpt_export_time_per_output_token_seconds_bucket"):
        assert name in metrics, name
    assert 'status="401"' in metrics and 'status="404"' in metrics and 'task="sst2"' in metrics
    # the caches: a request for a task whose prompt KV is cached is a hit; every count only grows
    def cache(kind, text):
        return float(re.search(rf'mpt_export_cache_{kind}_total{{cache="prompt_kv"}} ([0-9.e+]+)', text).group(1))

    before = httpx.get(srv.url + "/metrics", headers=h).text
    for _ in range(2):
        assert httpx.post(srv.url + "/v1/completions", headers=h, timeout=60,
                          json={"model": "qnli", "prompt": "the movie", "max_tokens": 2}).status_code == 200
    after = httpx.get(srv.url + "/metrics", headers=h).text
    assert cache("hits", after) >= cache("hits", before) + 1 and cache("misses", after) >= cache("misses", before)
    assert 'mpt_export_cache_entries{cache="prompt_kv"}' in after and 'mpt_export_cache_size{cache="prompt"}' in after


def test_one_request_never_fails_another(srv, offline):
    """A temperature that used to overflow (1e-320, inside the API's [0, 2]) sent beside greedy requests: every
    request answers 200 with its offline text; a browser-style cross-site POST (no JSON content type) is refused;
    prompts far beyond what the model could take are refused without tokenizing while /health stays fast."""
    c = srv.client()
    jobs = [dict(model="sst2", prompt=PROMPTS[i], max_tokens=10, temperature=0) for i in range(3)]
    jobs.append(dict(model="mnli", prompt=PROMPTS[3], max_tokens=10, temperature=1e-320, seed=3))
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda j: c.completions.create(**j).choices[0].text, jobs))
    assert got == [offline(j["model"], j["prompt"], 10) for j in jobs]  # below 1e-5 a temperature is greedy
    h = {"Authorization": f"Bearer {KEY}"}
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**h, **({"Content-Type": ctype} if ctype else {})}
        body = json.dumps({"model": "sst2", "prompt": "x", "max_tokens": 2})
        r = httpx.post(srv.url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", (ctype, r.text)
        r = httpx.post(srv.url + "/admin/reload", content=b"", headers=headers)
        assert r.status_code == 415, (ctype, r.text)
    # the cap: positions x the longest token's bytes; four prompts at it run while four far beyond it are refused
    from mpt_export.serving.http.protocol import prompt_cap

    cap = prompt_cap(offline.session)
    at_cap = ("the movie was " * cap)[:cap]
    huge = "the movie was " * (900_000 // 14)
    slow = []

    def call(text):
        t0 = time.monotonic()
        r = httpx.post(srv.url + "/v1/completions", json={"model": "rte", "prompt": text, "max_tokens": 2},
                       headers=h, timeout=120)
        return r, time.monotonic() - t0

    with ThreadPoolExecutor(8) as ex:
        futs = [ex.submit(call, t) for t in [at_cap, huge] * 4]
        while not all(f.done() for f in futs):
            t0 = time.monotonic()
            assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
            slow.append(time.monotonic() - t0)
            time.sleep(0.05)
        results = [f.result() for f in futs]
    assert max(slow, default=0) < 0.5, slow
    for i, (r, _) in enumerate(results):
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == "prompt", err
        assert err["code"] == ("prompt_too_long" if i % 2 else None), err  # at the cap: too many tokens
    assert max(dt for r, dt in results[1::2]) < 2.0


def test_disconnect_frees_the_row(srv):
    c = srv.client()
    since = srv.steps()["step_count"]
    stream = c.completions.create(model="qnli", prompt="the movie was", max_tokens=400, temperature=0, stream=True)
    it = iter(stream)
    next(it)
    stream.close()  # the client goes away mid-stream
    time.sleep(0.5)
    steps = [s for s in srv.steps()["steps"] if s["step"] > since]
    rid = steps[0]["requests"][0]
    ran = [s for s in steps if rid in s["requests"]]
    assert len(ran) < 300, len(ran)  # it stopped long before its 400 tokens
    assert "mpt_export_running_batch_size 0.0" in httpx.get(srv.url + "/metrics", headers=AUTH).text

"""The server, for real: `mpt-export serve` on 127.0.0.1 (a free port), driven by the official `openai` client and
httpx; results compared with the library's own offline generation."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import mpt_export  # noqa: E402

EXE = Path(sys.executable).with_name("mpt-export")
KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """A `mpt-export serve` process owned by the test that started it (stopped by its pid)."""

    def __init__(self, bundle, *args, env=None):
        self.proc = subprocess.Popen([str(EXE), "serve", str(bundle), "--port", "0", *map(str, args)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None:
            m = next((re.search(r"listening on http://127\.0\.0\.1:(\d+)", x) for x in self.lines if "listening" in x), None)
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.lines}")
            else:
                time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server not ready: {self.lines}")

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def steps(self, key=KEY):
        return httpx.get(self.url + "/admin/steps", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()

    def stop(self, timeout=60) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def server(bundle, *args, env=None, ready=True):
    s = Server(bundle, *args, env=env)
    try:
        yield s.wait_ready() if ready else s
    finally:
        if s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGKILL)
            s.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Llama-GQA model big enough that a request takes a while (so others can join it), 3 source tasks + 1
    target task; its bundle."""
    from transformers import AutoModelForCausalLM

    from mpt_export.tools.demo import make_base_model, make_source_adapter, make_target_adapter

    root = tmp_path_factory.mktemp("served")
    model = make_base_model(root / "base", arch="llama-gqa", hidden=128, layers=4, heads=4, max_positions=512, seed=7)
    src = make_source_adapter(model, root / "src", num_tasks=3, num_virtual_tokens=8, num_ranks=2, seed=8)
    tgt = make_target_adapter(AutoModelForCausalLM.from_pretrained(str(root / "base")), root / "tgt", src,
                              source_task=1, seed=9)
    b = mpt_export.export_bundle(root / "base", [f"sst2,mnli,qnli={src}", f"rte={tgt}"], root / "bundle", seed=1)
    b.close()
    return {"root": root, "bundle": root / "bundle", "base": root / "base", "target": tgt}


@pytest.fixture(scope="module")
def offline(served):
    s = mpt_export.load_bundle(served["bundle"]).session()

    def gen(task, prompt, max_tokens, **kw):
        return s.generate([prompt], [task], max_new_tokens=max_tokens, **kw)[0]

    gen.session = s
    return gen


@pytest.fixture(scope="module")
def srv(served):
    with server(served["bundle"], "--api-key", KEY, "--max-batch", "16") as s:
        yield s
        assert s.stop() == 0


PROMPTS = ["the movie was", "the premise clearly", "the station is next to", "one frozen backbone",
           "does the premise entail", "prompt tuning learns"]


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
           ({"model": "sst2", "prompt": "x", "logprobs": 2}, "logprobs"),
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


def test_queue_full_is_429_and_the_server_recovers(served):
    with server(served["bundle"], "--max-batch", "1", "--max-queue", "1") as s:
        c = s.client()
        busy = c.completions.create(model="sst2", prompt="the movie was", max_tokens=480, temperature=0,
                                    stream=True)  # long enough to outlast the probe on a loaded machine
        it = iter(busy)
        next(it)  # the only row is busy
        waiting = threading.Thread(target=lambda: c.completions.create(model="mnli", prompt="x y", max_tokens=2,
                                                                       temperature=0))
        waiting.start()  # fills the queue of one
        deadline = time.monotonic() + 10
        while "mpt_export_queue_depth 1.0" not in httpx.get(s.url + "/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with ThreadPoolExecutor(6) as ex:  # several at once: the busy row may finish early on a loaded machine
            probes = list(ex.map(lambda _: httpx.post(s.url + "/v1/completions", timeout=60, json={
                "model": "qnli", "prompt": "z", "max_tokens": 2}), range(6)))
        r = next((p for p in probes if p.status_code == 429), None)
        assert r is not None and r.headers["retry-after"] == "1", [p.status_code for p in probes]
        assert r.json()["error"]["code"] == "queue_full"
        assert all(p.status_code in (200, 429) for p in probes)
        list(it)
        waiting.join(timeout=60)
        r = c.completions.create(model="qnli", prompt="z", max_tokens=2, temperature=0)  # healthy afterwards
        assert r.choices[0].finish_reason in ("stop", "length")
        assert s.stop() == 0


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


def test_sigterm_drains_a_request_in_flight(served, offline):
    with server(served["bundle"], "--drain-timeout", "60") as s:
        c = s.client()
        out = {}

        def run():
            out["text"] = c.completions.create(model="rte", prompt=PROMPTS[0], max_tokens=250, temperature=0
                                               ).choices[0].text

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 30
        while "mpt_export_running_batch_size 1.0" not in httpx.get(s.url + "/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(s.proc.pid, signal.SIGTERM)
        t.join(timeout=60)
        assert s.proc.wait(timeout=60) == 0
        assert out["text"] == offline("rte", PROMPTS[0], 250)
        assert any("draining" in x for x in s.lines)


def test_health_while_loading_and_reload(served, tmp_path):
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(served["bundle"], b)
    with server(b, "--api-key", KEY, env={"MPT_EXPORT_SERVE_LOAD_DELAY": "1.5"}, ready=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        s.wait_ready()
        c = s.client()
        # a task added on disk appears after a reload, while a request is in flight
        stream = c.completions.create(model="sst2", prompt="the movie was", max_tokens=120, temperature=0, stream=True)
        it = iter(stream)
        first = next(it).choices[0].text
        res = subprocess.run([str(EXE), "tasks", "add", str(b), "--adapter", f"fresh={served['target']}"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        r = httpx.post(s.url + "/admin/reload", json={}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["added"] == ["fresh"]
        assert "fresh" in [m.id for m in c.models.list().data]
        assert first + "".join(ch.choices[0].text for ch in it) == \
            mpt_export.load_bundle(b).session().generate(["the movie was"], ["sst2"], max_new_tokens=120)[0]
        r = c.completions.create(model="fresh", prompt="the plot", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        # SIGHUP reloads too
        subprocess.run([str(EXE), "tasks", "remove", str(b), "fresh"], check=True, capture_output=True, timeout=120)
        os.kill(s.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "fresh" in [m.id for m in c.models.list().data]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a changed backbone is not reloaded
        mpt_export.export_bundle(served["base"], [f"sst2,mnli,qnli={served['root'] / 'src'}"], b, force=True,
                                 dtype="fp16", validate=False).close()
        r = httpx.post(s.url + "/admin/reload", json={}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "restart_required"
        assert c.completions.create(model="rte", prompt="x y", max_tokens=2, temperature=0).choices
        assert s.stop() == 0


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
        bad = httpx.post(s.url + "/v1/chat/completions", json={"model": "mnli", "messages": "hi"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
        assert s.stop() == 0


def test_a_t5_bundle_is_served(make_case):
    case = make_case("t5", 2)
    sess = mpt_export.load_bundle(case.bundle).session()
    with server(case.bundle) as s:
        c = s.client()
        jobs = [("a", "the movie", 6), ("t", "the plot was", 9), ("b", "one", 4), ("c", "a frozen backbone", 7)]
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda j: c.completions.create(model=j[0], prompt=j[1], max_tokens=j[2],
                                                             temperature=0).choices[0].text, jobs))
        assert got == [sess.generate([p], [t], max_new_tokens=n)[0] for t, p, n in jobs]
        text = "".join(ch.choices[0].text for ch in c.completions.create(model="t", prompt="the plot was",
                                                                          max_tokens=9, temperature=0, stream=True))
        assert text == got[1]
        assert s.stop() == 0


def test_bench_serve_tiny_runs_end_to_end(tmp_path):
    """The bench drives its own server with a client process of its own and reports every figure."""
    from conftest import run_cli

    res = run_cli("bench-serve", "--preset", "tiny", "--workdir", tmp_path, "--clients", "4", "--requests", "8",
                  "--prompt-len", "8", "--max-tokens", "6", "--json")
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout)
    assert r["clients"] == 4 and r["requests"] == 8
    for mode in ("sequential", "concurrent"):
        row = r[mode]
        assert row["requests"] == 8 and 8 <= row["tokens"] <= 48 and row["tokens_per_s"] > 0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"]
    assert r["sequential"]["tokens"] == r["concurrent"]["tokens"]  # the same greedy requests, the same tokens
    assert r["concurrent"]["mean_batch"] > 1 and r["ceiling"]["tokens_per_s"] > 0 and r["served_vs_ceiling"] > 0

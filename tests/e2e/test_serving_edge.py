"""The server, for real: `mpt-export serve` on 127.0.0.1 (a free port), driven by httpx, the official `openai`
client and raw sockets. This module: the edge of the server — every numeric field read by one checked rule, the
Host allow-list, header / keep-alive / concurrency limits, prompt scoring off the event loop, a client that goes
away logged in one line."""

from __future__ import annotations

import json
import math

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from servers import AUTH, KEY, server  # noqa: E402

HUGE = 10**400  # a JSON integer no float holds


@pytest.fixture(scope="module")
def srv(served):
    with server(served["bundle"], "--api-key", KEY) as s:
        yield s
        assert s.stop() == 0


def _local_port(r) -> int:
    """The client side's port of the connection ``r`` came on (the same port: the same keep-alive connection)."""
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def test_every_numeric_field_is_checked_by_one_rule(srv):
    """A huge integer, NaN / Infinity (Python's json reads them), a bool, a string and an out-of-range value in every
    numeric field: a 400 naming the field, and the keep-alive connection goes on serving."""
    completions = {"model": "sst2", "prompt": "the movie was", "max_tokens": 1}
    chat = {"model": "sst2", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    fields = [("/v1/completions", completions, k) for k in
              ("max_tokens", "temperature", "top_p", "top_k", "logprobs", "min_tokens", "seed", "n")]
    fields += [("/v1/chat/completions", chat, k) for k in ("top_logprobs", "max_completion_tokens", "temperature")]
    out_of_range = {"max_tokens": [-1], "temperature": [2.5, -0.1], "top_p": [0, 1.5], "top_k": [-1],
                    "logprobs": [6, -1], "min_tokens": [-1], "seed": [2**63, -1], "n": [2, 0],
                    "top_logprobs": [21, -1], "max_completion_tokens": [0]}
    with httpx.Client(base_url=srv.url, headers={**AUTH, "Content-Type": "application/json"}, timeout=30) as c:
        port = _local_port(c.get("/v1/models"))
        for path, body, key in fields:
            for value in [HUGE, -HUGE, math.nan, math.inf, -math.inf, True, False, "1", [1], 1.5 if key not in (
                    "temperature", "top_p") else "0.5", *out_of_range[key]]:
                r = c.post(path, content=json.dumps({**body, key: value}))  # NaN / Infinity as Python writes them
                assert r.status_code == 400, (key, value, r.text)
                err = r.json()["error"]
                assert err["param"] == key and err["type"] == "invalid_request_error", (key, value, err)
                assert len(err["message"]) < 200 and key in err["message"], err
                assert _local_port(r) == port, "the connection was dropped after a refused number"
        # the same connection still serves; the bounds' edges are accepted
        ok = c.post("/v1/completions", content=json.dumps({**completions, "seed": 2**63 - 1, "temperature": 2,
                                                            "top_p": 1, "n": 1, "logprobs": 5, "top_k": 2**40}))
        assert ok.status_code == 200, ok.text
        assert _local_port(ok) == port
        for key, value in (("stream_options", []), ("stream_options", "x"), ("n", True),
                           ("stream_options", {"include_usage": 1})):
            r = c.post("/v1/completions", content=json.dumps({**completions, "stream": True, key: value}))
            assert r.status_code == 400 and r.json()["error"]["param"] == key, (key, value, r.text)
        r = c.post("/v1/completions", content=json.dumps({**completions, "stream_options": None}))
        assert r.status_code == 200, r.text


def _health_latencies(srv, busy) -> list[float]:
    """``/health``'s answer times, asked every 50 ms while the thread ``busy`` runs (at most 300 asks)."""
    import time

    times = []
    with httpx.Client(base_url=srv.url, timeout=30) as c:
        while busy.is_alive() and len(times) < 300:
            t = time.perf_counter()
            assert c.get("/health").status_code == 200
            times.append(time.perf_counter() - t)
            time.sleep(0.05)
    return times


def test_prompt_scoring_leaves_the_event_loop_free(srv, offline):
    """echo over 256 prompts of 240 tokens each: scored, turned into text offsets and JSON in worker threads, so
    /health answers at once meanwhile (it waited seconds when the offsets were worked out on the event loop, each
    prefix decoded again); the offsets are each token's position in the text, as before."""
    import threading
    import time

    big = {"model": "sst2", "prompt": [[5] * 240] * 256, "echo": True, "max_tokens": 0, "logprobs": 5}
    out = {}

    def post():
        t = time.perf_counter()
        out["r"] = httpx.post(srv.url + "/v1/completions", headers=AUTH, json=big, timeout=300)
        out["s"] = time.perf_counter() - t

    busy = threading.Thread(target=post)
    busy.start()
    time.sleep(0.2)
    latencies = _health_latencies(srv, busy)
    busy.join(300)
    assert out["r"].status_code == 200, out["r"].text[:300]
    choices = out["r"].json()["choices"]
    assert len(choices) == 256 and len(choices[0]["logprobs"]["text_offset"]) == 240
    assert len(latencies) >= 3, f"the echo request took only {out['s']:.1f} s"
    print(f"echo 256 x 240 tokens: {out['s']:.1f} s; /health meanwhile: {len(latencies)} asks, "
          f"slowest {max(latencies) * 1000:.0f} ms")
    assert max(latencies) < 1.0, latencies
    # a normal prompt: tokens and offsets as each prefix's decoded length gives them
    tok = offline.session.tokenizer
    ids = tok.encode("héllo, the mövie was ✓ 漢字 and the plot")
    r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "mnli", "prompt": ids, "echo": True, "max_tokens": 3, "logprobs": 1,
                         "temperature": 0}).json()["choices"][0]
    lp = r["logprobs"]
    assert lp["tokens"][:len(ids)] == [tok.token_text(t) for t in ids]
    assert lp["text_offset"][:len(ids)] == [len(tok.decode(ids[:i])) for i in range(len(ids))]
    head = len(tok.decode(ids))
    assert lp["text_offset"][len(ids)] == head and lp["text_offset"] == sorted(lp["text_offset"])


@pytest.fixture(scope="module")
def wide(served, tmp_path_factory):
    """The served bundle with 27 more tasks: 24 copies of the source tasks, and three whose vectors are finite but
    overflow float32 when composed (cols and rows x 1e30: every prompt embedding is infinite, every logit NaN)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    from mpt_export.export.task_edits import add_tasks

    root = tmp_path_factory.mktemp("wide")
    shutil.copytree(served["bundle"], root / "bundle")
    src = served["root"] / "src"
    shutil.copytree(src, root / "overflow")
    w = load_file(str(src / "adapter_model.safetensors"))
    w = {k: (v * np.float32(1e30) if k.startswith("prefix_task") else v) for k, v in w.items()}
    save_file(w, str(root / "overflow" / "adapter_model.safetensors"))
    specs = [f"nan0,nan1,nan2={root / 'overflow'}"]
    specs += [f"x{3 * i},x{3 * i + 1},x{3 * i + 2}={src}" for i in range(8)]
    add_tasks(root / "bundle", specs).close()
    return root / "bundle"


def test_a_task_whose_numbers_overflow_fails_alone(wide):
    """Scoring (echo) and generating with a task whose logits are NaN: that request alone fails with 500
    generation_failed (the body strict JSON), requests for other tasks running at the same time get their answers;
    an unknown model's 404 names 20 tasks and where to find the rest."""
    from concurrent.futures import ThreadPoolExecutor

    def post(task, **kw):
        body = {"model": task, "prompt": [[5, 6, 7, 8] * 4] * 3, "echo": True, "max_tokens": 0, "logprobs": 2, **kw}
        return httpx.post(s.url + "/v1/completions", json=body, timeout=120)

    with server(wide) as s:
        jobs = [("nan0", {}), ("sst2", {}), ("nan1", {"max_tokens": 2}), ("x5", {}), ("nan2", {"max_tokens": 0}),
                ("mnli", {"max_tokens": 2, "temperature": 0})]
        with ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(lambda j: post(j[0], **j[1]), jobs))
        for (task, _), r in zip(jobs, got):
            body = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON of {task}"))
            if task.startswith("nan"):
                assert r.status_code == 500 and body["error"]["code"] == "generation_failed", (task, r.text)
            else:
                assert r.status_code == 200, (task, r.text)
                assert all(len(ch["logprobs"]["token_logprobs"]) >= 16 for ch in body["choices"])
        r = httpx.post(s.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        assert "sst2, mnli" in err["message"] and "x12" in err["message"] and "x13" not in err["message"]
        assert "… and 11 more; GET /v1/models lists them" in err["message"] and len(err["message"]) < 400
        assert s.stop() == 0

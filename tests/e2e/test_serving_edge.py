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


BAD_TOKEN = 9  # the wide bundle's NaN token


@pytest.fixture(scope="module")
def wide(served, tmp_path_factory):
    """The served bundle with 24 more tasks (copies of the source tasks), damaged so that one token's embedding row
    is NaN (checksums made to match again): every request whose prompt holds that token gets NaN logits."""
    import shutil

    from support import poison_token

    from mpt_export.export.task_edits import add_tasks

    root = tmp_path_factory.mktemp("wide")
    shutil.copytree(served["bundle"], root / "bundle")
    src = served["root"] / "src"
    add_tasks(root / "bundle", [f"x{3 * i},x{3 * i + 1},x{3 * i + 2}={src}" for i in range(8)]).close()
    poison_token(root / "bundle", BAD_TOKEN)
    return root / "bundle"


def test_a_request_whose_numbers_fail_fails_alone(wide):
    """Scoring (echo) and generating where the logits are NaN: that request alone fails with 500
    generation_failed (the body strict JSON), requests for other tasks running at the same time get their answers;
    an unknown model's 404 names 20 tasks and where to find the rest."""
    from concurrent.futures import ThreadPoolExecutor

    def post(job, **kw):
        task, bad = job.split("/")
        row = [5, 6, 7, BAD_TOKEN if bad == "nan" else 8] * 4
        body = {"model": task, "prompt": [row] * 3, "echo": True, "max_tokens": 0, "logprobs": 2, **kw}
        return httpx.post(s.url + "/v1/completions", json=body, timeout=120)

    with server(wide) as s:
        jobs = [("x1/nan", {}), ("sst2/ok", {}), ("mnli/nan", {"max_tokens": 2}), ("x5/ok", {}),
                ("x7/nan", {"max_tokens": 0}), ("mnli/ok", {"max_tokens": 2, "temperature": 0})]
        with ThreadPoolExecutor(len(jobs)) as ex:
            got = list(ex.map(lambda j: post(j[0], **j[1]), jobs))
        for (task, _), r in zip(jobs, got):
            body = json.loads(r.text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON of {task}"))
            if task.endswith("/nan"):
                assert r.status_code == 500 and body["error"]["code"] == "generation_failed", (task, r.text)
            else:
                assert r.status_code == 200, (task, r.text)
                assert all(len(ch["logprobs"]["token_logprobs"]) >= 16 for ch in body["choices"])
        r = httpx.post(s.url + "/v1/completions", json={"model": "nope", "prompt": "x"})
        err = r.json()["error"]
        assert r.status_code == 404 and err["code"] == "model_not_found" and err["param"] == "model"
        assert "sst2, mnli" in err["message"] and "x15" in err["message"] and "x16" not in err["message"]
        assert "… and 8 more; GET /v1/models lists them" in err["message"] and len(err["message"]) < 400
        assert s.stop() == 0


@pytest.fixture(scope="module")
def edge(served):
    """A server with short connection limits: headers within 1 s, idle keep-alive connections closed after 2 s, at
    most 60 connections and requests; answering the name good.example too."""
    with server(served["bundle"], "--api-key", KEY, "--allowed-host", "good.example", "--header-timeout", "1",
                "--keep-alive-timeout", "2", "--limit-concurrency", "60") as s:
        yield s
        assert s.stop() == 0
        assert "Traceback" not in s.log(400), s.log()


def _refused_host(r, host):
    err = r.json()["error"]
    assert r.status_code == 400 and err["code"] == "host_not_allowed", (host, r.status_code, r.text)
    assert "--allowed-host" in err["message"] and host.split(":")[0] in err["message"]
    assert "location" not in r.headers


def test_foreign_hosts_are_refused(edge, served):
    """DNS rebinding: a request naming another host is refused on every route (the admin ones, the API, a path with
    a trailing slash that once redirected to that host), with or without an API key; loopback names with a port,
    --host and --allowed-host names are answered; --allowed-host '*' answers any."""
    port = edge.port
    for host in (f"attacker.example:{port}", "evil.example", "localhost.evil.example", "127.0.0.1.evil.example"):
        with httpx.Client(base_url=edge.url, headers={**AUTH, "Host": host}, timeout=30) as c:
            _refused_host(c.post("/admin/reload", headers={"Content-Type": "application/json"}), host)
            _refused_host(c.get("/v1/models"), host)
            _refused_host(c.get("/admin/steps/"), host)
            _refused_host(c.get("/health"), host)
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "LOCALHOST", "good.example",
                 "Good.Example:8443"):
        r = httpx.get(edge.url + "/v1/models", headers={**AUTH, "Host": host})
        assert r.status_code == 200, (host, r.text)
    r = httpx.get(edge.url + "/admin/steps/", headers={**AUTH, "Host": "localhost"})
    assert r.status_code == 404 and "location" not in r.headers  # no redirect built from a Host
    with server(served["bundle"]) as plain:  # no key, default names
        _refused_host(httpx.post(plain.url + "/admin/reload", headers={"Host": "evil.example",
                                                                       "Content-Type": "application/json"}), "evil")
        assert plain.stop() == 0
    with server(served["bundle"], "--allowed-host", "*") as anyhost:
        r = httpx.get(anyhost.url + "/v1/models", headers={"Host": "evil.example"})
        assert r.status_code == 200, r.text
        assert anyhost.stop() == 0


def _closed_within(sock, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (it answers nothing first)."""
    import socket
    import time

    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(4096) == b"":
                return True
        except socket.timeout:
            continue
        except OSError:
            return True
    return False


def test_headers_are_due_within_the_header_timeout(edge):
    """Half a request line, or headers trickled a byte at a time: the connection is closed once the header timeout
    (1 s here) passes, and /health answers meanwhile; an idle keep-alive connection is closed after its timeout."""
    import socket
    import time

    half = socket.create_connection(("127.0.0.1", edge.port))
    half.sendall(b"GET /hea")
    t = time.monotonic()
    assert _closed_within(half, 10) and time.monotonic() - t < 5
    half.close()

    trickling = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(40)]
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
    start, closed = time.monotonic(), set()
    with httpx.Client(base_url=edge.url, timeout=10) as c:
        for i in range(len(request)):  # one byte per socket every 0.1 s, at most ~10 s
            if len(closed) == len(trickling) or time.monotonic() - start > 10:
                break
            for k, s in enumerate(trickling):
                if k not in closed:
                    try:
                        s.sendall(request[i:i + 1])
                    except OSError:
                        closed.add(k)
            assert c.get("/health").status_code == 200
            time.sleep(0.1)
    assert all(k in closed or _closed_within(s, 3) for k, s in enumerate(trickling))
    assert time.monotonic() - start < 8
    for s in trickling:
        s.close()

    idle = socket.create_connection(("127.0.0.1", edge.port))
    idle.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"200" in idle.recv(4096).split(b"\r\n")[0]
    t = time.monotonic()
    assert _closed_within(idle, 10) and 1 < time.monotonic() - t < 6  # --keep-alive-timeout 2
    idle.close()


def test_the_concurrency_limit_is_an_openai_shaped_503(edge):
    """60 connections open (none sending): the next request gets 503 server_busy, OpenAI-shaped; once the header
    timeout closes them, the server answers again."""
    import socket
    import time

    held = [socket.create_connection(("127.0.0.1", edge.port)) for _ in range(60)]
    try:
        r = httpx.get(edge.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_busy", r.text
        assert r.headers["retry-after"] == "1"
        deadline = time.monotonic() + 10
        while httpx.get(edge.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the held connections were never closed"
            time.sleep(0.2)
    finally:
        for s in held:
            s.close()


def test_a_client_that_goes_away_is_one_log_line(edge):
    """Mid-body (Content-Length 1000, 10 bytes sent) and mid-stream: each is one line on the server's standard error,
    no traceback."""
    import socket
    import time

    before = len(edge.lines)
    s = socket.create_connection(("127.0.0.1", edge.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{\"model\":")
    time.sleep(0.3)
    s.close()
    body = {"model": "sst2", "prompt": "the movie was", "max_tokens": 300, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", edge.url + "/v1/completions", headers=AUTH, json=body, timeout=60) as r:
        lines = r.iter_lines()
        next(lines)
        next(lines)
    deadline = time.monotonic() + 10
    while sum("disconnected" in x for x in edge.lines[before:]) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    new = edge.lines[before:]
    assert sum("disconnected" in x for x in new) == 2, new
    assert not any("Traceback" in x or "Exception in ASGI" in x for x in new), "\n".join(new)

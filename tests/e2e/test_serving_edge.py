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

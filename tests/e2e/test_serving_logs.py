"""The server's access log, for real: one line per request on standard error once its response has been sent — client,
method, path, status, task, tokens generated, milliseconds — for answers, streams, errors and plain routes; one JSON
object per line with --log-format json; none with --quiet; an unknown format refused before the server starts."""

from __future__ import annotations

import json
import re
import time

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from servers import server  # noqa: E402
from support import assert_clean_failure, cli  # noqa: E402

LINE = re.compile(r'^127\.0\.0\.1:\d+ "(?P<method>[A-Z]+) (?P<path>\S+)" (?P<status>\d{3}) task=(?P<task>\S+) '
                  r'tokens=(?P<tokens>\S+) (?P<ms>\d+\.\d) ms$')


def _requests(s) -> None:
    c = s.client()
    c.completions.create(model="sst2", prompt="the movie was", max_tokens=5, temperature=0, extra_body={
        "min_tokens": 5})
    list(c.completions.create(model="mnli", prompt="the premise", max_tokens=3, temperature=0, stream=True,
                              extra_body={"min_tokens": 3}))
    c.models.list()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="no-such-task", prompt="x", max_tokens=2)


def _access_lines(s, parse, path) -> tuple[list, list]:
    """(the /health lines of the start-up wait, the 4 lines of :func:`_requests`)."""
    deadline = time.monotonic() + 30  # a line is written when its response has been sent
    while True:
        got = [parse(x) for x in s.lines if parse(x) is not None]
        rest = [g for g in got if path(g) != "/health"]
        if len(rest) >= 4 or time.monotonic() > deadline:
            return [g for g in got if path(g) == "/health"], rest


def test_every_request_gets_an_access_line(served):
    with server(served["bundle"]) as s:
        _requests(s)
        health, lines = _access_lines(s, LINE.match, lambda m: m["path"])
        assert s.stop() == 0
    assert health[-1]["status"] == "200" and {m["status"] for m in health} <= {"200", "503"}  # the start-up wait
    got = [(m["method"], m["path"], m["status"], m["task"], m["tokens"]) for m in lines]
    assert got == [("POST", "/v1/completions", "200", "sst2", "5"), ("POST", "/v1/completions", "200", "mnli", "3"),
                       ("GET", "/v1/models", "200", "-", "-"), ("POST", "/v1/completions", "404", "-", "-")], got
    assert all(float(m["ms"]) >= 0 for m in lines + health)


def test_json_access_lines_and_quiet(served):
    with server(served["bundle"], "--log-format", "json") as s:
        _requests(s)

        def parse(x):
            try:
                return json.loads(x)
            except ValueError:
                return None
        health, lines = _access_lines(s, parse, lambda d: d["path"])
        assert s.stop() == 0
    assert health and health[-1]["status"] == 200
    assert [(d["method"], d["path"], d["status"], d["task"], d["tokens"]) for d in lines] == [
        ("POST", "/v1/completions", 200, "sst2", 5), ("POST", "/v1/completions", 200, "mnli", 3),
        ("GET", "/v1/models", 200, None, None), ("POST", "/v1/completions", 404, None, None)]
    assert all(d["ms"] >= 0 and d["client"].startswith("127.0.0.1:") and d["time"] for d in lines)
    with server(served["bundle"], "--quiet") as s:
        _requests(s)
        time.sleep(0.5)
        assert s.stop() == 0
    assert not [x for x in s.lines if LINE.match(x) or x.startswith("{")], s.lines
    assert_clean_failure(cli("serve", served["bundle"], "--log-format", "xml"), "unknown --log-format 'xml'",
                         "text, json")

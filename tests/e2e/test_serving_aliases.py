"""serve --task-alias ALIAS=TASK and --default-task, for real: the alias answers as its task does (same tokens),
/v1/models lists it with its task as parent; a request without a model runs the default task (and is a 400 without
one); a wrong alias or default — an unknown task, a name that is a task already, a malformed one — stops the server
before it listens with one clear line."""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from servers import server  # noqa: E402
from support import assert_clean_failure, cli  # noqa: E402


def test_an_alias_runs_its_task(served, offline):
    with server(served["bundle"], "--task-alias", "sentiment=sst2", "--task-alias", "entail = mnli",
                "--default-task", "sentiment") as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "the movie was", "max_tokens": 6, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == offline("sst2", "the movie was", 6)
        c = s.client()
        ids = {m.id: m for m in c.models.list()}
        assert ids["sentiment"].parent == "sst2" and ids["entail"].parent == "mnli"
        assert {"sst2", "mnli", "qnli", "rte"} <= set(ids)
        for alias, task in (("sentiment", "sst2"), ("entail", "mnli")):
            got = c.completions.create(model=alias, prompt="the movie was", max_tokens=6, temperature=0)
            want = c.completions.create(model=task, prompt="the movie was", max_tokens=6, temperature=0)
            assert got.choices[0].text == want.choices[0].text == offline(task, "the movie was", 6)
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="neutral", prompt="x", max_tokens=2)
        assert s.stop() == 0


def test_a_wrong_alias_is_one_clear_line(served):
    b = served["bundle"]
    for spec, needle in (("x=nope", "the bundle has no task 'nope'"), ("sst2=mnli", "is a task of the bundle already"),
                         ("novalue", "--task-alias takes ALIAS=TASK")):
        assert_clean_failure(cli("serve", b, "--port", "0", "--task-alias", spec), needle)
    assert_clean_failure(cli("serve", b, "--port", "0", "--task-alias", "a=sst2", "--task-alias", "a=mnli"),
                         "names 'a' twice")
    assert_clean_failure(cli("serve", b, "--port", "0", "--default-task", "nope"), "--default-task nope")


def test_without_a_default_a_request_must_name_its_model(served):
    with server(served["bundle"]) as s:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert s.stop() == 0

"""Structured outputs over HTTP, for real: the served bundle's random-weight model answers only what the constraint
allows — OpenAI's ``response_format`` (json_object, json_schema) and vLLM's ``structured_outputs`` (json, regex,
choice, grammar, whitespace_pattern) through the official `openai` client, streamed and not (chat: in
test_serving_models.py, whose bundle has a chat template),
concurrent with unconstrained requests that get what they get alone; bad constraints are 400s naming the field,
before any compute."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from servers import AUTH, KEY, server  # noqa: E402

SCHEMA = {"type": "object", "properties": {"label": {"enum": ["entailment", "neutral", "contradiction"]},
                                           "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
          "required": ["label", "confidence"], "additionalProperties": False}
TASKS = ["sst2", "mnli", "qnli"]


@pytest.fixture(scope="module")
def srv(served):
    with server(served["bundle"], "--api-key", KEY) as s:
        yield s


def test_json_schema_choice_regex_and_grammar_through_the_openai_client(srv):
    c = srv.client()
    for i, task in enumerate(TASKS):
        for temp in (0, 1.0):
            r = c.completions.create(model=task, prompt="premise: a cat sat. hypothesis:", max_tokens=40,
                                     temperature=temp, seed=i,  # (OpenAI's field, in chat's client only)
                                     extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                         "name": "nli", "schema": SCHEMA, "strict": True}}})
            text = r.choices[0].text
            jsonschema.validate(json.loads(text), SCHEMA)
            assert text == json.dumps(json.loads(text), separators=(",", ":"))  # compact by default
            assert r.choices[0].finish_reason == "stop"
            r = c.completions.create(model=task, prompt="sentiment:", max_tokens=8, temperature=temp, seed=i,
                                     extra_body={"structured_outputs": {"choice": ["positive", "negative"]}})
            assert r.choices[0].text in ("positive", "negative")
            r = c.completions.create(model=task, prompt="a date:", max_tokens=16, temperature=temp, seed=i,
                                     extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
            assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", r.choices[0].text)
    r = c.completions.create(model="mnli", prompt="json please", max_tokens=200, temperature=0.7, seed=4,
                             extra_body={"response_format": {"type": "json_object"}})
    assert r.choices[0].text.startswith("{")  # (any object: a random model may not close it within the budget)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    r = c.completions.create(model="sst2", prompt="x", max_tokens=10, temperature=0.9, seed=1,
                             extra_body={"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}})
    assert r.choices[0].text in ("yes", "no")
    r = c.completions.create(model="sst2", prompt="x", max_tokens=40, temperature=0, extra_body={
        "structured_outputs": {"json": SCHEMA, "whitespace_pattern": " "}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)
    # streamed: the pieces add up to the same constrained text
    chunks = list(c.completions.create(model="qnli", prompt="hi", max_tokens=40, temperature=0, stream=True,
                                       extra_body={"structured_outputs": {"json": SCHEMA}}))
    streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    whole = c.completions.create(model="qnli", prompt="hi", max_tokens=40, temperature=0,
                                 extra_body={"structured_outputs": {"json": SCHEMA}}).choices[0].text
    assert streamed == whole and jsonschema.validate(json.loads(whole), SCHEMA) is None


def test_constrained_and_free_requests_share_batches(srv):
    """Unconstrained requests sent together with constrained ones get exactly what they get alone."""
    c = srv.client()

    def free(i):
        return c.completions.create(model=TASKS[i % 3], prompt=f"the movie was {i}", max_tokens=12, temperature=0.8,
                                    seed=i).choices[0].text

    def bound(i):
        return c.completions.create(model=TASKS[i % 3], prompt=f"label {i}", max_tokens=40, temperature=1.0, seed=i,
                                    extra_body={"structured_outputs": {"json": SCHEMA}}).choices[0].text

    alone = [free(i) for i in range(4)]
    before = srv.steps()["step_count"]
    with ThreadPoolExecutor(8) as pool:
        futs = [pool.submit(free, i) for i in range(4)] + [pool.submit(bound, i) for i in range(4)]
        got = [f.result() for f in futs]
    assert got[:4] == alone
    for text in got[4:]:
        jsonschema.validate(json.loads(text), SCHEMA)
    decode = [st for st in srv.steps()["steps"] if st["step"] > before and st["kind"] == "decode"]
    assert max(st["batch"] for st in decode) > 1  # they really shared decode steps


@pytest.mark.parametrize("body,param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "start: ???"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"choice": ["a"], "regex": "b"}}, "structured_outputs"),
    ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json"),
    ({"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern"),
    ({"structured_outputs": {"structural_tag": {"x": 1}}}, "structured_outputs.structural_tag"),
    ({"structured_outputs": {"grammer": "x"}}, "structured_outputs.grammer"),
    ({"structured_outputs": "json"}, "structured_outputs"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs"),
])
def test_bad_constraints_are_400s_naming_the_field(srv, body, param):
    before = srv.steps()["step_count"]
    r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=30,
                   json={"model": "sst2", "prompt": "x", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    assert srv.steps()["step_count"] == before  # refused before any compute

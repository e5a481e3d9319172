"""Structured outputs in the decode loop, on random-weight models (their free text is noise: only the constraint can
make an output valid): JSON schemas, any JSON object, regular expressions, choices, Lark and GBNF grammars — greedy and
sampled, several tasks, constrained and unconstrained rows in one batch (the unconstrained ones equal to their solo
runs), min_tokens, stop strings and log-probabilities with a constraint, bad constraints refused before any compute,
and the CLI."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

import mpt_export  # noqa: E402
from mpt_export import Constraint  # noqa: E402
from mpt_export.errors import InputError  # noqa: E402
from support import assert_clean_failure, cli, left_padded, serve_all, solo  # noqa: E402

# (the test model has 64 positions: outputs that fit in 50 tokens)
SCHEMA = {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["label", "score"], "additionalProperties": False}
REGEX = r"[a-z]{2,6}@[a-z]{2,5}\.(com|org)"
CHOICES = ["positive", "negative", "neutral"]
LARK = 'start: "(" NUM (OP NUM)? ")"\nNUM: /[0-9]{1,2}/\nOP: "+" | "-"'
GBNF = 'root ::= "yes" | "no" | "maybe"'


@pytest.fixture(scope="module")
def session(make_case):
    return mpt_export.load_bundle(make_case("llama-gqa").bundle).session()


def _texts(s, res) -> list[str]:
    return [s.decode_row(res, b) for b in range(len(res.finish))]


CHECKS = [
    (Constraint.json_schema(SCHEMA), lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
    (Constraint.json_object(), lambda t: isinstance(json.loads(t), dict)),
    (Constraint.regex(REGEX), lambda t: re.fullmatch(REGEX, t) is not None),
    (Constraint.choice(CHOICES), lambda t: t in CHOICES),
    (Constraint.grammar(LARK), lambda t: re.fullmatch(r"\([0-9]{1,2}([+-][0-9]{1,2})?\)", t) is not None),
    (Constraint.grammar(GBNF), lambda t: t in ("yes", "no", "maybe")),
]


@pytest.mark.parametrize("k", range(len(CHECKS)), ids=["schema", "object", "regex", "choice", "lark", "gbnf"])
def test_every_output_satisfies_its_constraint_greedy_and_sampled(session, k):
    c, ok = CHECKS[k]
    s = session
    ids, mask = left_padded(s.vocab_size, [6, 3, 8, 5], seed=k)
    tasks = list(s.tasks[:4]) if len(s.tasks) >= 4 else (s.tasks * 4)[:4]
    for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}, {"temperature": 0.8, "top_k": 20, "seed": 1}):
        res = s.generate_detailed(ids, tasks, mask, max_new_tokens=50, constraint=c, **settings)
        for t, fin in zip(_texts(s, res), res.finish):
            if c.kind == "json_object" and fin == "length":  # any object: nothing bounds its length
                assert t.startswith("{"), t
                continue
            assert fin in ("eos", "stop"), (fin, t)  # complete, not cut by the budget
            assert ok(t), (k, settings, t)


def test_unconstrained_rows_in_a_constrained_batch_equal_their_solo_runs(session):
    """The server's batches mix constrained and free rows (the scheduler drives each row with its own settings): the
    free rows give exactly what they give alone, the constrained ones valid JSON."""
    from mpt_export.scheduler import Scheduler

    s = session
    free = [dict(task=t, ids=[5 + i, 9, 11, 30], max_new_tokens=12, temperature=0.7, seed=3)
            for i, t in enumerate(s.tasks[:3])]
    bound = [dict(task=t, ids=[7, 8, 9 + i], max_new_tokens=50, temperature=1.0, seed=i,
                  constraint=Constraint.json_schema(SCHEMA)) for i, t in enumerate(s.tasks[:3])]
    sched = Scheduler(s, max_batch=8).start()
    try:
        reqs = serve_all(sched, [j for pair in zip(free, bound) for j in pair])
    finally:
        sched.stop()
    assert [r.error for r in reqs] == [None] * 6
    assert [r.tokens for r in reqs[0::2]] == [solo(s, j) for j in free]
    for r in reqs[1::2]:
        jsonschema.validate(json.loads(r.text), SCHEMA)
    assert [r.tokens for r in reqs[1::2]] == [solo(s, j) for j in bound]  # constrained rows too: batch-invariant


def test_min_tokens_stop_and_logprobs_with_a_constraint(session):
    s = session
    ids = np.array([[3, 4, 5]])
    t = s.tasks[0]
    # min_tokens holds EOS back where the constraint allows more; a choice that is complete ends the row anyway
    res = s.generate_detailed(ids, [t], max_new_tokens=30, constraint=Constraint.regex(r"[a-c]{1,20}"), min_tokens=6)
    assert len(res.ids[0][: res.lengths[0]]) >= 6 and re.fullmatch(r"[a-c]{1,20}", s.decode_row(res, 0))
    res = s.generate_detailed(ids, [t], max_new_tokens=30, constraint=Constraint.choice(["ok"]), min_tokens=20)
    assert s.decode_row(res, 0) == "ok" and res.finish[0] in ("eos", "stop")
    # a stop string cuts the constrained text as it cuts any text
    res = s.generate_detailed(ids, [t], max_new_tokens=40, constraint=Constraint.regex(r"aaa;bbb;ccc"), stop=[";"])
    assert s.decode_row(res, 0, [";"]) == "aaa" and res.finish[0] == "stop"
    # log-probabilities are the model's own distribution (before the mask): the same as without a constraint
    forced = s.generate_detailed(ids, [t], max_new_tokens=4, constraint=Constraint.regex("abcd"), logprobs=2)
    toks = forced.ids[0][:4]
    free = s.generate_detailed(ids, [t], max_new_tokens=4, forced_tokens=toks[None], logprobs=2)
    for a, b in zip(forced.logprobs[0], free.logprobs[0]):  # (the free run records its own choices' entries)
        assert [t for t, _ in a[1]] == [t for t, _ in b[1]] and np.allclose([x for _, x in a[1]], [x for _, x in b[1]])


def test_bad_constraints_are_one_clear_error_naming_the_field(session):
    s = session
    bad = [(lambda: Constraint.json_schema({"type": "foo"}), "json_schema"),
           (lambda: Constraint.regex("(unclosed"), "regex"),
           (lambda: Constraint.grammar("start: ???"), "grammar"),
           (lambda: Constraint.choice([]), "choice"),
           (lambda: Constraint.json_schema("{not json"), "json_schema"),
           (lambda: Constraint("json_schema", {}, whitespace_pattern=5), "constraint")]
    for make, param in bad:
        with pytest.raises(InputError) as e:
            s.generate_detailed(np.array([[3, 4]]), [s.tasks[0]], max_new_tokens=4, constraint=make())
        assert e.value.param == param, (param, e.value)
    with pytest.raises(InputError, match="constraint must be a Constraint"):
        s.generate_detailed(np.array([[3, 4]]), [s.tasks[0]], max_new_tokens=4, constraint={"regex": "a"})


def test_generate_cli_takes_the_same_constraints(make_case, tmp_path):
    b = make_case("llama-gqa").bundle
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    res = cli("generate", b, "hello", "there", "--task", mpt_export.load_bundle(b).tasks[0], "--json-schema", schema,
              "--max-new-tokens", "50", "--json", "--temperature", "0.9", "--seed", "2")
    assert res.returncode == 0, res.stderr
    for line in res.stdout.splitlines():
        jsonschema.validate(json.loads(json.loads(line)["text"]), SCHEMA)
    res = cli("generate", b, "hi", "--task", mpt_export.load_bundle(b).tasks[1], "--choice", "yes", "--choice", "no",
              "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["text"] in ("yes", "no"), res.stdout
    grammar = tmp_path / "g.gbnf"
    grammar.write_text(GBNF)
    res = cli("generate", b, "hi", "--task", mpt_export.load_bundle(b).tasks[0], "--grammar", grammar, "--json")
    assert res.returncode == 0 and json.loads(res.stdout)["text"] in ("yes", "no", "maybe"), res.stdout
    assert_clean_failure(cli("generate", b, "hi", "--task", "t", "--regex", "(x"), "--regex")
    assert_clean_failure(cli("generate", b, "hi", "--task", "t", "--regex", "x", "--choice", "a"), "give one output constraint")


def test_a_seq2seq_bundle_takes_the_same_constraints(make_case):
    """T5: the decoder's rows go through the same loop, so the same masks apply."""
    s = mpt_export.load_bundle(make_case("t5", 2).bundle).session()
    ids, mask = np.random.default_rng(2).integers(2, s.vocab_size, (2, 5)), None
    tasks = (list(s.tasks) * 2)[:2]
    for c, ok in (CHECKS[3], CHECKS[2]):  # a choice, a regex
        for settings in ({"temperature": 0}, {"temperature": 1.0, "seed": 3}):
            res = s.generate_detailed(ids, tasks, mask, max_new_tokens=30, constraint=c, **settings)
            assert all(ok(t) for t in _texts(s, res)), (c.kind, _texts(s, res))

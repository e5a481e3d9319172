"""One settings object for generation (``SamplingParams``): checked once, each bad value naming its field as data;
each entry point's defaults declared once; the HTTP server's 400 names the field the error carries (never one
guessed from the message)."""

from __future__ import annotations

import dataclasses

import pytest

from mpt_export.errors import InputError
from mpt_export.runtime.sampling import SamplingConfig, SamplingParams


def test_one_frozen_object_keeps_the_old_name_and_order():
    assert SamplingConfig is SamplingParams
    p = SamplingParams(4, 0.5, 3, 0.9, 7, 2, 1, True)  # the order SamplingConfig had
    assert (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.seed, p.logprobs, p.min_tokens, p.ignore_eos) == \
        (4, 0.5, 3, 0.9, 7, 2, 1, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 1.0
    assert SamplingParams(stop="x").stop == ("x",) and SamplingParams(stop=[]).stop is None
    assert SamplingParams.of(p, top_k=0) == SamplingParams(4, 0.5, 0, 0.9, 7, 2, 1, True)
    assert SamplingParams.of(None) == SamplingParams() and hash(SamplingParams(stop=["a", "b"]))
    assert SamplingParams(eos_token_id=None).eos(5) is None and SamplingParams().eos(5) == 5
    assert SamplingParams(eos_token_id=3).eos(5) == 3


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("max_new_tokens", True), ("temperature", -1),
    ("temperature", float("nan")), ("temperature", "hot"), ("top_k", -1), ("top_k", 1.5), ("top_p", 0),
    ("top_p", 1.5), ("seed", -1), ("seed", 1.0), ("logprobs", 21), ("logprobs", False), ("min_tokens", 17),
    ("ignore_eos", 1), ("stop", [""]), ("stop", [3]), ("eos_token_id", -2), ("eos_token_id", "model")])
def test_a_bad_value_names_its_field(field, value):
    with pytest.raises(InputError) as e:
        SamplingParams(**{field: value})
    assert e.value.param == field and str(e.value).startswith(field), str(e.value)


def test_unknown_settings_are_named():
    with pytest.raises(InputError, match="unknown generation setting.*temprature") as e:
        SamplingParams.of(temprature=0.5)
    assert e.value.param == "temprature"


def test_each_entry_point_declares_its_defaults_once():
    from mpt_export.cli.generate import CLI_DEFAULTS
    from mpt_export.serving.http.protocol import HTTP_DEFAULTS, sampling
    from mpt_export.serving.triton.generate import TRITON_DEFAULTS, TritonGeneration

    api = SamplingParams()  # Session.generate_detailed: greedy, 16 tokens
    assert (api.max_new_tokens, api.temperature, api.top_p, api.seed) == (16, 0.0, 1.0, None)
    assert (HTTP_DEFAULTS.max_new_tokens, HTTP_DEFAULTS.temperature, HTTP_DEFAULTS.top_p) == (16, 1.0, 1.0)  # OpenAI's
    assert (CLI_DEFAULTS.max_new_tokens, CLI_DEFAULTS.temperature) == (32, 0.0)
    assert (TRITON_DEFAULTS.max_new_tokens, TRITON_DEFAULTS.temperature) == (16, 0.0)
    # what a body / a Triton request leaves out comes from those objects
    assert sampling({}, chat=False, max_tokens=16) == HTTP_DEFAULTS
    assert sampling({"temperature": 0, "stop": "x", "seed": 3}, False, 5) == \
        SamplingParams.of(HTTP_DEFAULTS, max_new_tokens=5, temperature=0.0, stop="x", seed=3)
    assert TritonGeneration.sampling({}) == TRITON_DEFAULTS
    import numpy as np

    got = TritonGeneration.sampling({"max_tokens": np.array([[4]], np.int32), "temperature": np.array([0.5], np.float32),
                                     "stop": np.array([b"a", b"b"], dtype=object)})
    assert got == SamplingParams.of(TRITON_DEFAULTS, max_new_tokens=4, temperature=0.5, stop=["a", "b"])
    with pytest.raises(InputError) as e:
        TritonGeneration.sampling({"top_p": np.array([2.0], np.float32)})
    assert e.value.param == "top_p"


def test_the_http_answer_names_the_field_the_error_carries():
    from mpt_export.errors import OptionError, QueueFull, TaskNameError
    from mpt_export.serving.http.errors import APIError, api_error
    from mpt_export.serving.http.protocol import sampling

    # the wire's names for the library's fields; the message is never read for it
    assert api_error(InputError("40 new tokens do not fit", param="max_new_tokens")).param == "max_tokens"
    assert api_error(InputError("input of 900 tokens is too long", param="input_ids")).param == "prompt"
    assert api_error(InputError("temperature is mentioned first", param="seed")).param == "seed"
    assert api_error(InputError("no field named")).param == "prompt"
    assert api_error(OptionError("bad", param="top_k")).status == 400
    assert api_error(TaskNameError("unknown task 'x'")).status == 404
    assert api_error(QueueFull("full")).status == 429
    for body, param in (({"temperature": 3}, "temperature"), ({"seed": -1}, "seed"), ({"seed": True}, "seed"),
                        ({"min_tokens": 9}, "min_tokens"), ({"ignore_eos": "yes"}, "ignore_eos"),
                        ({"stop": [""]}, "stop"), ({"stop": ["a"] * 17}, "stop"), ({"top_k": -2}, "top_k"),
                        ({"logprobs": 6}, "logprobs")):
        with pytest.raises(APIError) as e:
            sampling(body, chat=False, max_tokens=8)
        assert e.value.status == 400 and e.value.param == param, (body, e.value.param, e.value.message)

"""Structured outputs on the wire: OpenAI's ``response_format`` (``text``, ``json_object``, ``json_schema``) and
vLLM's ``structured_outputs`` object (``json``, ``json_object``, ``regex``, ``choice``, ``grammar``,
``whitespace_pattern``; its older top-level ``guided_*`` fields too) -> one :class:`Constraint`, or a 400 naming the
field. Compiling it (llguidance) happens in a worker thread before the request is queued
(:func:`compile_constraint`), so a bad schema, regex or grammar is refused before any compute and a large one never
stalls the event loop."""

from __future__ import annotations

import asyncio

from ...errors import InputError
from ...runtime.constraints import Constraint, grammars_of
from .errors import APIError

KINDS = {"json": "json_schema", "json_object": "json_object", "regex": "regex", "choice": "choice",
         "grammar": "grammar"}
IGNORED = {"disable_fallback", "disable_additional_properties", "disable_any_whitespace"}  # (vLLM backend hints)
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
          "guided_whitespace_pattern": "whitespace_pattern"}


def constraint_of(data: dict) -> Constraint | None:
    """The body's output constraint, or None."""
    rf = _response_format(data.get("response_format"))
    so = data.get("structured_outputs")
    guided = {GUIDED[k]: v for k, v in data.items() if k in GUIDED and v is not None}
    if guided and so is not None:
        raise APIError(400, "give structured_outputs or the older guided_* fields, not both",
                       param="structured_outputs")
    sc = _structured(so, "structured_outputs") if so is not None else _structured(guided, "guided_*") if guided else None
    if rf is not None and sc is not None:
        raise APIError(400, "give response_format or structured_outputs, not both", param="structured_outputs")
    return rf or sc


def _response_format(rf) -> Constraint | None:
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise APIError(400, "response_format must be an object with a type: text, json_object or json_schema",
                       param="response_format")
    kind = rf["type"]
    try:
        if kind == "text":
            return None
        if kind == "json_object":
            return Constraint.json_object(param="response_format")
        if kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or "schema" not in js:
                raise APIError(400, "response_format json_schema needs json_schema: {\"name\": ..., \"schema\": "
                               "{...}}", param="response_format.json_schema")
            strict = js.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise APIError(400, "response_format.json_schema.strict must be true or false",
                               param="response_format.json_schema.strict")
            return Constraint.json_schema(js["schema"], param="response_format.json_schema.schema")
    except InputError as e:
        raise APIError(400, str(e), param=e.param) from None
    raise APIError(400, f"response_format type {kind!r} is not supported; use text, json_object or json_schema",
                   param="response_format.type")


def _structured(so, where: str) -> Constraint:
    if not isinstance(so, dict):
        raise APIError(400, f"{where} must be an object, e.g. {{\"choice\": [\"yes\", \"no\"]}}", param=where)
    unknown = sorted(set(so) - set(KINDS) - IGNORED - {"whitespace_pattern", "structural_tag"})
    if unknown:
        raise APIError(400, f"{where}.{unknown[0]} is not known; give one of {', '.join(KINDS)} (and "
                       "whitespace_pattern for JSON)", param=f"{where}.{unknown[0]}")
    if so.get("structural_tag") is not None:
        raise APIError(400, "structural_tag is not supported by this server; use json, regex, choice or grammar",
                       param=f"{where}.structural_tag")
    given = [k for k in KINDS if so.get(k) not in (None, False)]
    if len(given) != 1:
        raise APIError(400, f"{where} takes exactly one of {', '.join(KINDS)}; "
                       + (f"got {', '.join(given)}" if given else "got none"), param=where)
    key = given[0]
    ws = so.get("whitespace_pattern")
    if ws is not None and key not in ("json", "json_object"):
        raise APIError(400, "whitespace_pattern applies to json and json_object only",
                       param=f"{where}.whitespace_pattern")
    if key == "json_object" and so[key] is not True:
        raise APIError(400, f"{where}.json_object must be true", param=f"{where}.json_object")
    try:
        return Constraint(KINDS[key], None if key == "json_object" else so[key], ws, param=f"{where}.{key}")
    except InputError as e:
        raise APIError(400, str(e), param=e.param) from None


async def compile_constraint(session, c: Constraint | None) -> None:
    """Compile ``c`` for the session's tokenizer in a worker thread (kept for the rows that use it): a bad one is a
    400 naming its field, before the request is queued."""
    if c is None:
        return
    try:
        await asyncio.to_thread(grammars_of(session).compile, c)
    except InputError as e:
        raise APIError(400, str(e), param=e.param or c.param) from None

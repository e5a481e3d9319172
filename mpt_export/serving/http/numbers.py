"""The one rule every numeric field of a request body is read by (:func:`number`), and the bounds each field has
(:data:`BOUNDS`: OpenAI's, and vLLM's for its own fields).

JSON numbers reach Python as ``int`` of any size, ``float`` (Python's json also reads the non-standard ``NaN`` and
``Infinity`` literals) or ``bool`` (``true`` is an ``int`` to Python). The rule: a bool is never a number; a float
must be finite; an integer field takes an int or an integral float; the value must lie within its field's bounds —
compared exactly (Python compares ints and floats without converting a huge int to float), so a 400-digit integer is
one 400 naming its field, never an ``OverflowError``. Every refusal is an :class:`APIError` 400 whose ``param`` is the
field."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .errors import APIError

INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Bounds:
    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is refused (top_p > 0)

    def holds(self, v) -> bool:
        return (self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)) and (self.hi is None or v <= self.hi)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.hi is None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        if self.integer:
            return f"{kind} from {self.lo} to {'2**63-1' if self.hi == INT64_MAX else self.hi}"
        return f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


# Each field's bounds. Integer fields without a natural limit stop at INT64_MAX (what the scheduler's numbers hold);
# max_tokens is checked against the model's positions after this.
BOUNDS = {
    "max_tokens": Bounds(True, 0, INT64_MAX),  # 0 only with echo (completions.py checks it)
    "max_completion_tokens": Bounds(True, 1, INT64_MAX),
    "temperature": Bounds(False, 0, 2),  # OpenAI's range
    "top_p": Bounds(False, 0, 1, lo_open=True),
    "top_k": Bounds(True, 0, INT64_MAX),  # vLLM's; 0 = off
    "min_tokens": Bounds(True, 0, INT64_MAX),  # vLLM's; at most max_tokens, checked by SamplingParams
    "seed": Bounds(True, 0, INT64_MAX),  # 0 <= seed < 2**63
    "logprobs": Bounds(True, 0, 5),  # completions: OpenAI's legacy limit
    "top_logprobs": Bounds(True, 0, 20),  # chat
    "n": Bounds(True, 1, INT64_MAX),  # and then it must be 1: one choice per prompt
}


def shown(v) -> str:
    """``v`` as a message quotes it: short, and a huge integer by its size (its digits are never printed)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 128:
        return f"an integer of about {int(v.bit_length() * 0.30103) + 1} digits"
    try:
        text = json.dumps(v)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 40 else text[:40] + "…"


def number(data: dict, key: str, default, bounds: Bounds | None = None, param: str | None = None):
    """``data[key]`` checked by the one rule against ``bounds`` (default: the field's :data:`BOUNDS`); ``default``
    where it is absent or null. -> an int for integer fields, else a float. ``param``: the field's name in the error
    (default ``key``)."""
    v = data.get(key)
    if v is None:
        return default
    b = bounds or BOUNDS[key]
    param = param or key
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise APIError(400, f"{param} must be {b.describe()}, got {shown(v)}", param=param)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"{param} must be a finite number ({b.describe()}), got {shown(v)}", param=param)
    if b.integer and isinstance(v, float) and not v.is_integer():
        raise APIError(400, f"{param} must be {b.describe()}, got {shown(v)}", param=param)
    if not b.holds(v):
        raise APIError(400, f"{param} must be {b.describe()}, got {shown(v)}", param=param)
    return int(v) if b.integer else float(v)


def check_numbers(data: dict, chat: bool) -> None:
    """Every numeric field ``data`` holds, checked by :func:`number` before anything else reads the body (so a bad
    number is refused the same way whatever else the body holds). Chat's ``logprobs`` is a bool (checked where it is
    read)."""
    for key in BOUNDS:
        if key in data and not (chat and key == "logprobs"):
            number(data, key, None)

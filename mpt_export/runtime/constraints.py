"""Structured outputs: a :class:`Constraint` (a JSON schema, any JSON object, a regular expression, a list of choices
or a grammar) makes a row generate only text the constraint accepts.

The matching is llguidance's (what ONNX Runtime GenAI, llama.cpp and vLLM use): the bundle's ``tokenizer.json``
becomes its tokenizer once per session, each distinct constraint is compiled once and kept (:class:`Grammars`), and
each constrained row carries its own matcher. At every step, before the row's token is chosen, the matcher's mask
sets the logits of the tokens the constraint does not allow there to -inf (greedy and sampled alike); EOS is allowed
only where the constraint's text may end, and a row whose constraint is complete and cannot go on ends there
(finish ``stop``). Rows without a constraint are not touched.

JSON is generated compact by default (no whitespace between tokens of the JSON: on a small model free whitespace eats
the token budget); ``whitespace_pattern`` (a regular expression) allows the whitespace it matches instead.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import GenerationError, InputError
from .cache import LRU

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_CHOICES = 10_000
MAX_TEXT = 1 << 20  # a schema, regex or grammar of at most 1 MiB


@dataclass(frozen=True)
class Constraint:
    """What a row's output must be. Build one with :meth:`json_schema`, :meth:`json_object`, :meth:`regex`,
    :meth:`choice` or :meth:`grammar` (Lark, or llama.cpp's GBNF). ``param``: the request field it came from, named by
    the errors (not part of its identity)."""

    kind: str
    value: str | tuple | None = None  # the schema as canonical JSON, the regex, the choices, the grammar
    whitespace_pattern: str | None = None
    param: str = field(default="constraint", compare=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise InputError(f"unknown constraint kind {self.kind!r}; choose one of {', '.join(KINDS)}",
                             param=self.param)
        if self.whitespace_pattern is not None and (not isinstance(self.whitespace_pattern, str)
                                                    or self.kind not in ("json_schema", "json_object")):
            raise InputError("whitespace_pattern is a regular expression (a string) and applies to JSON outputs only",
                             param=self.param)
        if self.kind == "choice":
            v = self.value
            if not isinstance(v, (list, tuple)) or not v or not all(isinstance(c, str) and c for c in v):
                raise InputError(f"{self.param} must be a non-empty list of non-empty strings, got {_shown(v)}",
                                 param=self.param)
            if len(v) > MAX_CHOICES:
                raise InputError(f"{self.param} holds {len(v)} choices; at most {MAX_CHOICES}", param=self.param)
            object.__setattr__(self, "value", tuple(v))
        elif self.kind in ("regex", "grammar"):
            if not isinstance(self.value, str) or not self.value:
                raise InputError(f"{self.param} must be a non-empty string, got {_shown(self.value)}",
                                 param=self.param)
        elif self.kind == "json_schema":
            v = self.value
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError as e:
                    raise InputError(f"{self.param} is not valid JSON ({e})", param=self.param) from None
            if not isinstance(v, dict):
                raise InputError(f"{self.param} must be a JSON schema (an object), got {_shown(v)}", param=self.param)
            object.__setattr__(self, "value", json.dumps(v, sort_keys=True, separators=(",", ":")))
        if self.value is not None and len(self.value if isinstance(self.value, str) else "".join(self.value)) > MAX_TEXT:
            raise InputError(f"{self.param} is larger than {MAX_TEXT >> 20} MiB", param=self.param)

    @classmethod
    def json_schema(cls, schema: dict | str, whitespace_pattern: str | None = None, param: str = "json_schema"):
        return cls("json_schema", schema, whitespace_pattern, param)

    @classmethod
    def json_object(cls, whitespace_pattern: str | None = None, param: str = "json_object"):
        return cls("json_object", None, whitespace_pattern, param)

    @classmethod
    def regex(cls, pattern: str, param: str = "regex"):
        return cls("regex", pattern, None, param)

    @classmethod
    def choice(cls, choices, param: str = "choice"):
        return cls("choice", choices, None, param)

    @classmethod
    def grammar(cls, text: str, param: str = "grammar"):
        return cls("grammar", text, None, param)

    def with_param(self, param: str) -> "Constraint":
        return Constraint(self.kind, self.value, self.whitespace_pattern, param)

    def grammar_text(self) -> str:
        """llguidance's grammar for this constraint (no tokenizer needed)."""
        from llguidance import LLMatcher
        from llguidance.gbnf_to_lark import any_to_lark

        if self.kind in ("json_schema", "json_object"):
            schema = self.value if self.kind == "json_schema" else '{"type":"object"}'
            options = ({"whitespace_pattern": self.whitespace_pattern, "whitespace_flexible": True}
                       if self.whitespace_pattern is not None else {"whitespace_flexible": False})
            try:
                return LLMatcher.grammar_from_json_schema(schema, overrides=options)
            except ValueError as e:
                raise InputError(f"{self.param}: {e}", param=self.param) from None
        if self.kind == "regex":
            return LLMatcher.grammar_from_regex(self.value)
        if self.kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in self.value))
        try:
            return LLMatcher.grammar_from_lark(any_to_lark(self.value))
        except Exception as e:  # the converter's own errors: a grammar that is neither Lark nor GBNF
            raise InputError(f"{self.param} is neither a Lark nor a GBNF grammar: {e}", param=self.param) from None


def _shown(v) -> str:
    return repr(v)[:80]


def llguidance_module():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError:
        raise InputError("structured outputs need the llguidance package: pip install 'mpt-export[serve]' "
                         "(or pip install llguidance)") from None
    return llguidance


class Grammars:
    """A session's constraint compiler: the llguidance tokenizer made once from the session's tokenizer (the bundle's
    ``tokenizer.json``), each distinct constraint compiled once (an LRU of ready matchers, copied for each row)."""

    def __init__(self, tokenizer, vocab_size: int, eos: int | None, size: int = 256):
        self._source, self.vocab_size, self.eos = tokenizer, vocab_size, eos  # tokenizer: a BundleTokenizer
        self._tok = None
        self._compiled = LRU(size)
        self._lock = threading.Lock()
        self.n_vocab = 0  # the matchers' vocabulary (their masks' width), known once the tokenizer is made

    def tokenizer(self):
        llg = llguidance_module()
        with self._lock:
            if self._tok is None:
                hf = self._source.tok  # (llguidance reads the tokenizers library's own serialization)
                n = max(self.vocab_size, hf.get_vocab_size(with_added_tokens=True))
                self._tok = llg.LLTokenizer(hf.to_str(), n_vocab=n, eos_token=self.eos)
                self.n_vocab = self._tok.vocab_size
            return self._tok

    def compile(self, c: Constraint):
        """The constraint's ready matcher (kept; :meth:`matcher` copies it for a row), or an InputError naming
        ``c.param`` with llguidance's reason when the schema, regex or grammar is bad."""
        hit = self._compiled.get(c)
        if hit is not None:
            return hit
        m = llguidance_module().LLMatcher(self.tokenizer(), c.grammar_text(), log_level=0)  # (compiles without the GIL)
        if m.is_error():
            raise InputError(f"{c.param}: {_first_lines(m.get_error())}", param=c.param)
        self._compiled.put(c, m)
        return m

    def matcher(self, c: Constraint):
        """A fresh matcher for one row -> (matcher, its vocabulary size)."""
        return self.compile(c).deep_copy(), self.n_vocab


_SESSIONS_LOCK = threading.Lock()


def grammars_of(session) -> Grammars:
    """The session's :class:`Grammars` (made on first use: sessions that never see a constraint never load
    llguidance)."""
    with _SESSIONS_LOCK:
        g = session.__dict__.get("_grammars")
        if g is None:
            if not session.bundle.has_file("tokenizer/tokenizer.json"):
                raise InputError("this bundle has no tokenizer (tokenizer/tokenizer.json), which structured outputs "
                                 "need to know the text of each token")
            g = session.__dict__["_grammars"] = Grammars(session.tokenizer, session.vocab_size, session.eos_token_id)
        return g


def _first_lines(msg: str, n: int = 6) -> str:
    return " ".join(line.strip() for line in str(msg).strip().splitlines()[:n] if line.strip())[:600]


_EXECUTOR = None
NEG_INF_BITS = np.uint32(0xFF800000)  # float32 -inf
# what the masks cost, since the process started (``bench-structured`` reads it): decode steps with a constrained
# row, constrained rows, seconds in llguidance's mask fill, seconds applying the masks to the logits
MASK_STATS = {"steps": 0, "rows": 0, "llguidance_s": 0.0, "apply_s": 0.0}


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance_module().LLExecutor()
    return _EXECUTOR


def apply_masks(rows, logits: np.ndarray, failed: dict) -> np.ndarray:
    """The logits (b, V) with each constrained row's disallowed tokens at -inf (a copy when any row is constrained).
    A row whose matcher fails, or allows nothing, is put in ``failed`` (it ends alone)."""
    idx = [i for i, r in enumerate(rows) if r.matcher is not None and i not in failed]
    if not idx:
        return logits
    import llguidance.numpy as lln

    V = logits.shape[1]
    words = (max(V, *(rows[i].matcher_n for i in idx)) + 31) // 32
    masks = np.zeros((len(idx), words), np.int32)
    ok = []
    for j, i in enumerate(idx):
        if rows[i].matcher.is_error():
            failed[i] = GenerationError(f"the output constraint failed: {_first_lines(rows[i].matcher.get_error())}")
        else:
            ok.append((rows[i].matcher, j))
    t0 = time.perf_counter()
    if ok:
        lln.fill_next_token_bitmask_par(_executor(), ok, masks)
    t1 = time.perf_counter()
    # the masks applied with integer operations on the logits' bits (np.where over a batch of vocabularies costs
    # several times more): an allowed token keeps its logit, the others become -inf
    bits = np.unpackbits(masks.view(np.uint8), axis=1, count=V, bitorder="little")  # (k, V) 0/1
    keep = bits.astype(np.uint32)
    keep *= np.uint32(0xFFFFFFFF)
    masked = np.ascontiguousarray(logits[idx], np.float32).view(np.uint32) & keep
    masked |= ~keep & NEG_INF_BITS
    out = logits.copy()
    for j, i in enumerate(idx):
        if i in failed:
            continue
        if not bits[j].any():
            failed[i] = GenerationError("the output constraint allows no token here (the model's vocabulary cannot "
                                        f"continue it: {_first_lines(rows[i].matcher.get_error()) or 'no token fits'})")
            continue
        out[i] = masked[j].view(np.float32)
    MASK_STATS["steps"] += 1
    MASK_STATS["rows"] += len(idx)
    MASK_STATS["llguidance_s"] += t1 - t0
    MASK_STATS["apply_s"] += time.perf_counter() - t1
    return out

"""Token selection: greedy, or sampling with temperature / top-k / top-p. One generator per row, seeded from
(seed, row), so a row's draws do not depend on which other rows are still running.

Numerically safe for every temperature the checks accept: a temperature below :data:`GREEDY_BELOW` is greedy (the
distribution it asks for is the argmax to within float precision), and the logits are shifted by their maximum
*before* they are divided by the temperature, so no value overflows (``exp`` sees only numbers <= 0 and the
best token's is exactly 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from numbers import Integral

import numpy as np

from ..errors import InputError

MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's chat top_logprobs limit)
GREEDY_BELOW = 1e-5  # temperatures under this pick the argmax: exp(-delta / t) underflows for any useful delta


@dataclass(frozen=True)
class SamplingParams:
    """Every per-request generation setting, checked once here (an error names its field as ``param``) and then
    carried whole — from the HTTP body, the command line, Triton's inputs or ``Session.generate_detailed``'s
    keywords — to the decode loop, which reads it and rebuilds nothing. These field defaults are the Python API's;
    each entry point declares its own once (the HTTP server's are OpenAI's: ``temperature`` 1, ``max_tokens`` 16).
    The first eight fields keep the order ``SamplingConfig`` had, so positional construction still works."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None  # row i draws from the generator seeded (seed, i); None: a fresh seed
    logprobs: int | None = None  # record each token's log-probability and this many alternatives (None: none)
    min_tokens: int = 0  # EOS cannot be chosen before this many tokens
    ignore_eos: bool = False  # EOS is a token like any other: generate max_new_tokens
    stop: tuple[str, ...] | None = None  # a row ends where its text holds one of these (cut before it)
    eos_token_id: int | None | str = "auto"  # the token that ends a row: "auto" the model's, None none
    constraint: "Constraint | None" = None  # structured output: what the text must be (see .constraints)

    def __post_init__(self):
        if not _integer(self.max_new_tokens) or self.max_new_tokens <= 0:
            _bad("max_new_tokens", f"must be a positive integer, got {self.max_new_tokens!r}")
        self._set("max_new_tokens", int(self.max_new_tokens))
        self._set("temperature", _number("temperature", self.temperature))
        self._set("top_p", _number("top_p", self.top_p))
        if not (_integer(self.top_k) or isinstance(self.top_k, float) and self.top_k.is_integer()) \
                or self.top_k < 0:
            _bad("top_k", f"must be an integer >= 0 (0 = off), got {self.top_k!r}")
        self._set("top_k", int(self.top_k))
        if self.temperature < 0:
            _bad("temperature", f"must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            _bad("top_p", f"must be in (0, 1], got {self.top_p!r}")
        self._set("seed", _optional_int("seed", self.seed, "an integer >= 0"))
        self._set("logprobs", _optional_int("logprobs", self.logprobs, f"an integer from 0 to {MAX_LOGPROBS} "
                                            "(alternatives per token)", MAX_LOGPROBS))
        if not _integer(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            _bad("min_tokens", f"must be an integer from 0 to max_new_tokens ({self.max_new_tokens}), got "
                 f"{self.min_tokens!r}")
        self._set("min_tokens", int(self.min_tokens))
        if not isinstance(self.ignore_eos, bool):
            _bad("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        stop = check_stop(self.stop)
        self._set("stop", tuple(stop) if stop else None)
        if self.constraint is not None:
            from .constraints import Constraint

            if not isinstance(self.constraint, Constraint):
                _bad("constraint", f"must be a Constraint (mpt_export.Constraint.json_schema(...), .regex(...), "
                     f".choice([...]), .grammar(...)), got {type(self.constraint).__name__}")
        if self.eos_token_id != "auto":
            self._set("eos_token_id", _optional_int("eos_token_id", self.eos_token_id,
                                                    "a token id >= 0, None (no EOS) or 'auto' (the model's)"))

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

    @classmethod
    def of(cls, sampling: "SamplingParams | None" = None, **changes) -> "SamplingParams":
        """``sampling`` (or the defaults) with ``changes`` applied and checked again; an unknown setting is one
        clear error naming the settings there are."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise InputError(f"unknown generation setting(s) {', '.join(unknown)}; the settings are "
                             f"{', '.join(names)}", param=unknown[0])
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise InputError(f"sampling must be a SamplingParams, got {type(sampling).__name__}", param="sampling")
        base = sampling if sampling is not None else cls()
        return replace(base, **changes) if changes else base

    def eos(self, model_eos: int | None) -> int | None:
        """The token that ends a row: the model's (``model_eos``) unless ``eos_token_id`` names another or None."""
        return model_eos if self.eos_token_id == "auto" else self.eos_token_id

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generators(self, batch: int) -> list:
        """One numpy generator per row: row ``b`` draws from ``(seed, b)``."""
        seed = self.seed if self.seed is not None else int(np.random.SeedSequence().entropy % (2**63))
        return [np.random.default_rng([seed, b]) for b in range(batch)]


SamplingConfig = SamplingParams  # the name it had (documented): the same class


def _bad(name: str, what: str):
    raise InputError(f"{name} {what}", param=name)


def _integer(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _optional_int(name: str, v, what: str, hi: int | None = None) -> int | None:
    if v is None:
        return None
    if not _integer(v) or v < 0 or (hi is not None and v > hi):
        _bad(name, f"must be {what}, got {v!r}")
    return int(v)


def _number(name: str, v) -> float:
    if isinstance(v, bool):
        _bad(name, f"must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        _bad(name, f"must be a number, got {v!r}")
    if not math.isfinite(f):
        _bad(name, f"must be a finite number, got {v!r}")
    return f


def check_stop(stop) -> list[str] | None:
    """Stop strings: None, one string, or a list of non-empty strings."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r:.80}", param="stop")
    if any(s == "" for s in stop):
        raise InputError("stop strings must not be empty (an empty string would stop every row at once)",
                         param="stop")
    return list(stop) or None


def select(logits: np.ndarray, cfg: SamplingParams, rngs: list[np.random.Generator]) -> np.ndarray:
    """logits (B, V), rngs one per row -> token ids (B,). Each row draws one uniform number from its own generator
    per token (what ``Generator.choice`` draws), so a row's tokens do not depend on the batch."""
    if cfg.greedy:
        return logits.argmax(-1).astype(np.int64)
    out = np.empty(logits.shape[0], np.int64)
    scaled = logits.astype(np.float64)
    scaled -= scaled.max(-1, keepdims=True)
    scaled /= cfg.temperature  # <= 0 everywhere: nothing overflows
    if cfg.top_k and cfg.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -cfg.top_k, axis=-1)[:, -cfg.top_k:].min(-1, keepdims=True)
        scaled[scaled < kth] = -np.inf
    p = np.exp(scaled, out=scaled)  # unnormalized: the best token's is exp(0) = 1, so each row's sum is >= 1
    for b, row in enumerate(p):
        if cfg.top_p < 1.0:
            row = row / row.sum()
            order = np.argsort(-row, kind="stable")
            cum = np.cumsum(row[order])
            keep = order[: int(np.searchsorted(cum, cfg.top_p) + 1)]  # smallest set reaching top_p
            mask = np.zeros_like(row, bool)
            mask[keep] = True
            row = np.where(mask, row, 0.0)
        out[b] = _draw(row, rngs[b])
    return out


_BLOCK = 256  # the inverse-CDF draw: block sums first, then one block's running sum


def _draw(weights: np.ndarray, rng: np.random.Generator) -> int:
    """A token drawn with probability proportional to ``weights`` (V,) >= 0 from one uniform number: the index where
    the running sum passes ``u * total``, found over block sums and then inside one block, so a 150k vocabulary
    costs two short cumulative sums instead of one as long as the vocabulary (``Generator.choice`` also checks and
    normalizes ``p``: ~4x the time)."""
    V = weights.shape[0]
    pad = -V % _BLOCK
    w = np.concatenate([weights, np.zeros(pad)]) if pad else weights
    blocks = w.reshape(-1, _BLOCK)
    cum = np.cumsum(blocks.sum(1))
    target = rng.random() * cum[-1]
    j = min(int(np.searchsorted(cum, target, side="right")), len(cum) - 1)
    inner = np.cumsum(blocks[j])
    left = target - (cum[j - 1] if j else 0.0)
    i = min(int(np.searchsorted(inner, left, side="right")), _BLOCK - 1)
    tok = j * _BLOCK + i
    while weights[min(tok, V - 1)] == 0.0 and tok > 0:  # rounding at an edge: the nearest token that can be drawn
        tok -= 1
    return min(tok, V - 1)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of one row of logits (V,), in float64: the model's own distribution (no temperature)."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def token_logprobs(logits: np.ndarray, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """-> (``token``'s log-probability, the ``k`` most likely tokens with theirs, best first), from one row's
    logits."""
    lp = log_softmax(logits)
    top = np.argpartition(-lp, k - 1)[:k] if 0 < k < lp.size else (np.arange(lp.size) if k else np.array([], int))
    top = top[np.argsort(-lp[top], kind="stable")]
    return float(lp[token]), [(int(t), float(lp[t])) for t in top]

"""Token selection: greedy, or sampling with temperature / top-k / top-p. One generator per row, seeded from
(seed, row), so a row's draws do not depend on which other rows are still running.

Numerically safe for every temperature the checks accept: a temperature below :data:`GREEDY_BELOW` is greedy (the
distribution it asks for is the argmax to within float precision), and the logits are shifted by their maximum
*before* they are divided by the temperature, so no value overflows (``exp`` sees only numbers <= 0 and the
best token's is exactly 1)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError

MAX_LOGPROBS = 20  # alternatives per token at most (OpenAI's chat top_logprobs limit)
GREEDY_BELOW = 1e-5  # temperatures under this pick the argmax: exp(-delta / t) underflows for any useful delta


@dataclass
class SamplingConfig:
    max_new_tokens: int = 16
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int | None = None
    logprobs: int | None = None  # record each token's log-probability and this many alternatives (None: none)
    min_tokens: int = 0  # EOS cannot be chosen before this many tokens
    ignore_eos: bool = False  # EOS is a token like any other: generate max_new_tokens

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, (int, np.integer)) \
                or self.max_new_tokens <= 0:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        self.temperature = _number("temperature", self.temperature)
        self.top_p = _number("top_p", self.top_p)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) and not (
                isinstance(self.top_k, float) and self.top_k.is_integer()):
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        self.top_k = int(self.top_k)
        if self.temperature < 0:
            raise InputError(f"temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or self.seed < 0):
            raise InputError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(
                self.logprobs, (int, np.integer)) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS} (alternatives per token), got "
                             f"{self.logprobs!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, (int, np.integer)) or \
                not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InputError(f"min_tokens must be an integer from 0 to max_new_tokens ({self.max_new_tokens}), got "
                             f"{self.min_tokens!r}")
        if not isinstance(self.ignore_eos, bool):
            raise InputError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generators(self, batch: int) -> list[np.random.Generator]:
        seed = self.seed if self.seed is not None else int(np.random.SeedSequence().entropy % (2**63))
        return [np.random.default_rng([seed, b]) for b in range(batch)]


def _number(name: str, v) -> float:
    import math

    if isinstance(v, bool):
        raise InputError(f"{name} must be a number, got {v!r}")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {v!r}") from None
    if not math.isfinite(f):
        raise InputError(f"{name} must be a finite number, got {v!r}")
    return f


def check_stop(stop) -> list[str] | None:
    """Stop strings: None, one string, or a list of non-empty strings."""
    if stop is None:
        return None
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise InputError(f"stop must be a string or a list of strings, got {stop!r:.80}")
    if any(s == "" for s in stop):
        raise InputError("stop strings must not be empty (an empty string would stop every row at once)")
    return list(stop) or None


def select(logits: np.ndarray, cfg: SamplingConfig, rngs: list[np.random.Generator]) -> np.ndarray:
    """logits (B, V), rngs one per row -> token ids (B,)."""
    if cfg.greedy:
        return logits.argmax(-1).astype(np.int64)
    out = np.empty(logits.shape[0], np.int64)
    scaled = logits.astype(np.float64)
    scaled = (scaled - scaled.max(-1, keepdims=True)) / cfg.temperature  # <= 0 everywhere: nothing overflows
    for b, row in enumerate(scaled):
        if cfg.top_k and cfg.top_k < row.size:
            kth = np.partition(row, -cfg.top_k)[-cfg.top_k]
            row = np.where(row < kth, -np.inf, row)
        p = np.exp(row)  # the best token's is exp(0) = 1, so the sum is >= 1
        p /= p.sum()
        if cfg.top_p < 1.0:
            order = np.argsort(-p, kind="stable")
            cum = np.cumsum(p[order])
            keep = order[: int(np.searchsorted(cum, cfg.top_p) + 1)]  # smallest set reaching top_p
            mask = np.zeros_like(p, bool)
            mask[keep] = True
            p = np.where(mask, p, 0.0)
            p /= p.sum()
        out[b] = rngs[b].choice(p.size, p=p)
    return out


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

"""The decode loop's per-row logic, in one place: choosing each row's next token (greedy or sampled with its own
generator), recording it, EOS, stop strings, ``max_new_tokens``, finish reasons, the streamed text deltas and the
final text. :func:`generate` (``Session.generate_detailed``) and the serving scheduler (``mpt_export.scheduler``) both
drive rows through it, so a request's tokens and text are the same whichever runs it.

A row finishes with ``"eos"`` (the EOS token is recorded, not shown), ``"stop"`` (a stop string appeared: the text
is cut before it), ``"length"``, or ``"error"``: its own numbers failed (NaN or Inf logits, its sampling) and it left
the batch while the others went on; a graph call that fails for a whole batch is retried row by row
(:func:`generate_rows`), so one row never fails another. With a tokenizer, :meth:`Row.take` returns the text that became final with the
token (often "", see :mod:`.streaming`), and :meth:`Row.final_text` / :meth:`Row.rest` the whole text and what of
it was not streamed yet.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import GenerationError, InputError, MptExportError, NumericsError
from .sampling import SamplingParams, select, token_logprobs
from .streaming import TextStream, cut_at_stop


@dataclass
class GenerationResult:
    """``ids`` (B, N) int64, rows padded with EOS (or 0) after they stop; ``lengths`` tokens generated per row."""

    ids: np.ndarray
    lengths: np.ndarray
    finish: list[str]  # "eos" | "stop" | "length" | "error" per row
    timings: dict = field(default_factory=dict)
    tokens_processed: int = 0  # tokens run through the model (prompt rows included when not cached)
    logprobs: list | None = None  # per row, per token: (log-probability, [(alternative, log-probability)])
    errors: list = field(default_factory=list)  # per row: None, or the exception that ended it (finish "error")

    def failed(self) -> list[int]:
        """The rows that ended with an error."""
        return [b for b, e in enumerate(self.errors) if e is not None]

    def raise_failed(self) -> "GenerationResult":
        """-> self when no row failed; else raise the first failed row's error (naming the row in a batch), with
        this result as its ``result`` attribute (the other rows' output)."""
        failed = self.failed()
        if not failed:
            return self
        err = self.errors[failed[0]]
        if len(self.errors) > 1:
            more = f" ({len(failed) - 1} more row(s) failed)" if len(failed) > 1 else ""
            err = copy.copy(err)  # same type and fields, the row named
            err.args = (f"row {failed[0]}: {err}{more}",)
        err.result = self
        raise err


class Row:
    """One sequence being generated: its settings (:class:`~.sampling.SamplingParams`, read as they are) and
    generator, its tokens, its text and its finish. ``eos``: the model's EOS token (the settings' ``eos_token_id``
    may name another, or none)."""

    __slots__ = ("cfg", "rng", "eos", "eos_id", "stop", "tokens", "finish", "text", "logprobs", "matcher",
                 "matcher_n")

    def __init__(self, cfg: SamplingParams, rng, eos: int | None, tokenizer=None, stream: bool = False,
                 matcher=None):
        self.cfg, self.rng = cfg, rng
        # the row's constraint matcher and its vocabulary (``Grammars.matcher``), or None: an unconstrained row
        self.matcher, self.matcher_n = matcher if matcher is not None else (None, 0)
        self.stop = list(cfg.stop) if cfg.stop else None
        eos = cfg.eos(eos)
        self.eos_id = eos  # the row's EOS (min_tokens keeps it from being chosen early)
        self.eos = None if cfg.ignore_eos else eos  # the EOS that ends the row
        self.tokens: list[int] = []
        # per token: (its log-probability, [(alternative, log-probability)] best first), when asked for
        self.logprobs: list | None = [] if cfg.logprobs is not None else None
        self.finish: str | None = None
        # the text is followed token by token when it is streamed or a stop string must be found in it
        self.text = TextStream(tokenizer, self.stop, eos) if tokenizer is not None and (stream or self.stop) else None

    def take(self, tok: int) -> str | None:
        """Record one token. -> the text that became final with it ("" often; None for EOS, which is not text);
        :attr:`finish` is set when the row is done."""
        self.tokens.append(tok)
        if self.eos is not None and tok == self.eos:
            self.finish = "eos"
            return None
        if self.matcher is not None and not self.matcher.consume_token(tok):
            raise GenerationError(f"the output constraint refused token {tok}: {self.matcher.get_error()[:300]}")
        delta = self.text.push(tok) if self.text is not None else ""
        if self.text is not None and self.text.stopped:
            self.finish = "stop"
        elif self.matcher is not None and self.matcher.is_stopped():  # complete, and nothing may follow
            self.finish = "stop"
        elif len(self.tokens) >= self.cfg.max_new_tokens:
            self.finish = "length"
        return delta

    def final_text(self, tokenizer) -> str:
        toks = self.tokens[:-1] if self.finish == "eos" else self.tokens
        return cut_at_stop(tokenizer.decode(toks), self.stop)

    def rest(self, final_text: str) -> str:
        """What of the final text was not streamed by :meth:`take` yet."""
        return self.text.finish(final_text) if self.text is not None else final_text


def choose(rows: list[Row], logits: np.ndarray) -> tuple[np.ndarray, dict[int, Exception]]:
    """Each row's next token from its logits (b, V). -> (tokens (b,), {row index: error} for rows that cannot go on:
    NaN/Inf logits, or their sampling failed). Greedy rows take one vectorized argmax. A row before its
    ``min_tokens`` cannot choose EOS; a row that asked for log-probabilities records them from these logits (the
    model's own distribution: no temperature, no EOS mask)."""
    finite = np.isfinite(logits).all(-1)
    raw = logits
    failed: dict[int, Exception] = {i: NumericsError(f"the model produced NaN or Inf logits at generation step "
                                                     f"{len(r.tokens)}") for i, r in enumerate(rows) if not finite[i]}
    if any(r.matcher is not None for r in rows):
        from .constraints import apply_masks

        logits = apply_masks(rows, logits, failed)
    early = [i for i, r in enumerate(rows) if r.eos_id is not None and len(r.tokens) < r.cfg.min_tokens]
    if early:
        logits = logits.copy() if logits is raw else logits
        for i in early:  # (a constraint that can only end here ends the row, min_tokens or not)
            if rows[i].matcher is None or np.isfinite(np.delete(logits[i], rows[i].eos_id)).any():
                logits[i, rows[i].eos_id] = -np.inf
    nxt = np.zeros(len(rows), np.int64)
    greedy = [i for i, r in enumerate(rows) if r.cfg.greedy and i not in failed]
    if greedy:
        nxt[greedy] = logits[greedy].argmax(-1)
    for i, r in enumerate(rows):
        if i in failed:
            pass
        elif not r.cfg.greedy:
            try:
                nxt[i] = select(logits[i:i + 1], r.cfg, [r.rng])[0]
            except Exception as e:  # this row's own numbers
                failed[i] = e
        if r.logprobs is not None and i not in failed:
            r.logprobs.append(token_logprobs(raw[i], int(nxt[i]), r.cfg.logprobs))
    return nxt, failed


def row_error(e: Exception, task: str) -> MptExportError:
    """A row's own failure, naming its task and what to check."""
    if isinstance(e, NumericsError):
        return NumericsError(f"{e} (task {task}); the bundle or the task's vectors are broken — check them with "
                             "`mpt-export verify BUNDLE --base-model DIR`")
    if isinstance(e, MptExportError):
        return e
    return GenerationError(f"generation failed for this row alone (task {task}): {type(e).__name__}: {e}")


def generate(session, ids, tasks, mask, cfg: SamplingParams, use_cache: bool, on_step=None, on_text=None,
             forced_tokens=None, rngs=None) -> GenerationResult:
    """Prefill, then one-token steps feeding each step's KV back in; finished rows leave the batch (they stop
    costing work). Every row reads the one ``cfg``. ``on_step(step, rows, tokens)``: original row indices and their
    new tokens after every step; ``on_text(row, text)``: each row's streamed text (``Session.generate_detailed``
    documents the rest). ``rngs``: the rows' generators (a row run again alone keeps its own)."""
    B = ids.shape[0]
    eos = cfg.eos(session.eos_token_id)
    tok = session.tokenizer if (cfg.stop or on_text) else None
    grammars = None
    if cfg.constraint is not None:
        from .constraints import grammars_of

        if forced_tokens is not None:
            raise InputError("forced_tokens (teacher forcing) and an output constraint do not go together",
                             param="constraint")
        grammars = grammars_of(session)
    rows = [Row(cfg, rng, session.eos_token_id, tok, stream=on_text is not None,
                matcher=grammars.matcher(cfg.constraint) if grammars is not None else None)
            for rng in rngs or cfg.generators(B)]
    errors: list = [None] * B
    t0 = time.perf_counter()
    logits, state, processed = session.prefill(ids, tasks, mask, use_cache, new_tokens=cfg.max_new_tokens)
    t_prefill = time.perf_counter() - t0
    live = np.arange(B)  # original index of each running row
    for step in range(cfg.max_new_tokens):
        nxt, failed = choose([rows[r] for r in live], logits)  # (b,)
        for i, e in failed.items():  # those rows end here; the others go on
            rows[live[i]].finish, errors[live[i]] = "error", row_error(e, tasks[live[i]])
        ok = np.array([i not in failed for i in range(len(live))], bool)
        if on_step and ok.any():
            on_step(step, live[ok].copy(), nxt[ok].copy())
        for r, t in zip(live[ok], nxt[ok]):
            try:
                delta = rows[r].take(int(t))
            except MptExportError as e:  # this row's own (its constraint): it ends, the others go on
                rows[r].finish, errors[r] = "error", row_error(e, tasks[r])
                continue
            if on_text and delta:
                on_text(int(r), delta)
            if on_text and rows[r].finish:
                rest = rows[r].rest(rows[r].final_text(tok))
                if rest:
                    on_text(int(r), rest)
        keep = np.array([rows[r].finish is None for r in live])
        if not keep.any() or step == cfg.max_new_tokens - 1:
            break
        if forced_tokens is not None:
            nxt = np.asarray(forced_tokens, np.int64)[live, step]
        if not keep.all():  # finished rows leave the batch
            live, nxt = live[keep], nxt[keep]
            state = {k: session.take_rows(v, keep) for k, v in state.items()}
        logits, state = session.decode_step(state, nxt)
        processed += len(live)
    total = time.perf_counter() - t0
    lengths = np.array([len(r.tokens) for r in rows], np.int64)
    result = np.full((B, int(lengths.max())), eos if eos is not None else 0, np.int64)
    for b, r in enumerate(rows):
        result[b, :len(r.tokens)] = r.tokens
    return GenerationResult(result, lengths, [r.finish or "length" for r in rows],
                            {"prefill_s": t_prefill, "decode_s": total - t_prefill, "total_s": total},
                            tokens_processed=processed,
                            logprobs=[r.logprobs for r in rows] if cfg.logprobs is not None else None, errors=errors)


def generate_rows(session, ids, tasks, mask, cfg: SamplingParams, use_cache: bool, on_step=None, on_text=None,
                  forced_tokens=None) -> GenerationResult:
    """:func:`generate`, with a graph call that fails for the whole batch retried row by row: each row alone, with
    its own generator (so it draws what it would have drawn in the batch), its output or its error. Input errors
    are the caller's and are raised as they are."""
    rngs = cfg.generators(ids.shape[0])
    fresh = copy.deepcopy(rngs)  # a retried row draws from the start of its own sequence again
    sent = [0] * ids.shape[0]  # characters streamed per row: a retried row streams only what comes after them

    def streamed(r, delta):
        sent[r] += len(delta)
        on_text(r, delta)

    try:
        return generate(session, ids, tasks, mask, cfg, use_cache, on_step, on_text and streamed, forced_tokens,
                        rngs)
    except InputError:
        raise
    except Exception as e:
        if ids.shape[0] == 1:
            raise row_error(e, tasks[0]) from e
    parts = []
    for b in range(ids.shape[0]):
        keep = np.asarray(mask[b]).astype(bool)
        row_ids, row_mask = np.asarray(ids[b])[keep][None], np.ones((1, int(keep.sum())), np.int64)
        step = (lambda st, rs, tk, b=b: on_step(st, np.full_like(rs, b), tk)) if on_step else None
        text = _resumed(on_text, b, sent[b]) if on_text else None
        forced = None if forced_tokens is None else np.asarray(forced_tokens)[b:b + 1]
        try:
            parts.append(generate(session, row_ids, [tasks[b]], row_mask, cfg, use_cache, step, text, forced,
                                  [fresh[b]]))
        except Exception as e:  # this row fails alone
            parts.append(row_error(e, tasks[b]))
    return _joined(parts, cfg, session.eos_token_id)


def _resumed(on_text, b: int, skip: int):
    """``on_text`` for row ``b`` run again alone, leaving out its first ``skip`` characters (streamed already)."""
    left = [skip]

    def text(_r, delta):
        cut = min(left[0], len(delta))
        left[0] -= cut
        if delta[cut:]:
            on_text(b, delta[cut:])
    return text


def _joined(parts: list, cfg: SamplingParams, model_eos) -> GenerationResult:
    """One result from single-row results (or the exceptions that ended rows)."""
    eos = cfg.eos(model_eos)
    done = [p for p in parts if isinstance(p, GenerationResult)]
    lengths = np.array([int(p.lengths[0]) if isinstance(p, GenerationResult) else 0 for p in parts], np.int64)
    ids = np.full((len(parts), max(int(lengths.max()), 1)), eos if eos is not None else 0, np.int64)
    for b, p in enumerate(parts):
        if isinstance(p, GenerationResult):
            ids[b, :lengths[b]] = p.ids[0, :lengths[b]]
    timings = {k: sum(p.timings.get(k, 0.0) for p in done) for k in ("prefill_s", "decode_s", "total_s")}
    return GenerationResult(
        ids, lengths, [p.finish[0] if isinstance(p, GenerationResult) else "error" for p in parts], timings,
        tokens_processed=sum(p.tokens_processed for p in done),
        logprobs=[p.logprobs[0] if isinstance(p, GenerationResult) else [] for p in parts]
        if cfg.logprobs is not None else None,
        errors=[p.errors[0] if isinstance(p, GenerationResult) else p for p in parts])

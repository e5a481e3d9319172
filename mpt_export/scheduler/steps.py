"""One iteration's work on the running batch (the scheduler's loop calls it; see :mod:`.batching`): prefill the
newcomers, join them to the batch (in a free slot or by one rebuild), run one decode step, let finished rows leave,
compact. Every graph call is isolated per row: when a batched call fails it runs again row by row, so only a row
that fails on its own gets an error; per-row token choice, text and finish come from :mod:`mpt_export.runtime.decode`
(the loop ``Session.generate`` runs too)."""

from __future__ import annotations

import time

import numpy as np

from ..errors import GenerationError, MptExportError, NumericsError
from ..runtime.constraints import grammars_of
from ..runtime.decode import Row, choose
from .batchstate import build_state, copy_row, length_groups, unused_columns, used_columns
from .request import Request


class _Row:
    """A request in the batch: its per-row decode state (shared with ``Session.generate``) and its next input."""

    __slots__ = ("req", "gen", "next_token")

    def __init__(self, req: Request, tokenizer, eos, session):
        self.req = req
        cfg = req.sampling  # read as it is: the object the request was built with
        rng = cfg.generators(req.seed_row + 1)[req.seed_row] if not cfg.greedy else None
        matcher = grammars_of(session).matcher(cfg.constraint) if cfg.constraint is not None else None
        self.gen = Row(cfg, rng, eos, tokenizer, stream=True, matcher=matcher)
        req.tokens = self.gen.tokens  # one list: the request shows the tokens as they come
        req.token_logprobs = self.gen.logprobs
        self.next_token = None


def _row_error(what: str, req: Request, e: Exception) -> Exception:
    """The error one row ends with: ours as they are, anything else (a backend's own exception) named and wrapped."""
    if isinstance(e, MptExportError):
        return e
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return GenerationError(f"the {what} graph call failed for this request alone (task {req.task}, "
                           f"{len(req.ids)} input tokens, {len(req.tokens)} generated): {type(e).__name__}: {first}")


FREE_SLOT_STEPS = 4  # a finished row's slot waits this many decode steps for a newcomer before the batch is compacted


class BatchSteps:
    """The running batch and what one iteration does to it. :class:`~.batching.Scheduler` adds the queue, admission
    and the thread; ``session``, ``tokenizer``, ``eos``, ``pad_id`` and the fields below are set there."""

    _rows: list
    _state: dict | None

    def _log(self, kind: str, rows, graph_rows: int, t0: float) -> None:
        self.step_count += 1
        self.steps.append({"step": self.step_count, "kind": kind, "requests": [r.req.id for r in rows],
                           "batch": len(rows), "rows": graph_rows, "ms": round(1000 * (time.perf_counter() - t0), 3),
                           "t": time.time()})

    def _groups(self) -> dict:
        """The state's length groups (fixed per session kind: worked out once)."""
        if self._layout is None:
            self._layout = length_groups(self.session, self._state)
        return self._layout

    def _live(self) -> list[_Row]:
        return [r for r in self._rows if r is not None]

    def _prefill(self, reqs: list[Request]) -> None:
        rows = []
        for req in reqs:
            try:
                self.check(req)
                rows.append(_Row(req, self.tokenizer, self.eos, self.session))
            except MptExportError as e:  # e.g. its task was removed by a reload since it was queued
                self._fail(req, e)
        joining = []
        for part, out in self._isolated(rows, self._prefill_call, "prefill"):
            logits, state = out
            keep = self._advance(part, logits)
            joining += [(r, state, i) for i, (r, k) in enumerate(zip(part, keep)) if k]
        self._join(joining)

    def _prefill_call(self, rows: list[_Row]):
        """One prefill graph call for ``rows`` (left- or right-padded as the model wants) -> (logits, state)."""
        s = self.session
        S = max(len(r.req.ids) for r in rows)
        ids = np.full((len(rows), S), self.pad_id, np.int64)
        mask = np.zeros((len(rows), S), np.int64)
        for b, r in enumerate(rows):
            n = len(r.req.ids)
            sl = slice(S - n, S) if s.padding_side == "left" else slice(0, n)
            ids[b, sl], mask[b, sl] = r.req.ids, 1
        t0 = time.perf_counter()
        logits, state, _ = s.prefill(ids, [r.req.task for r in rows], mask,
                                     new_tokens=max(r.gen.cfg.max_new_tokens for r in rows))
        self._log("prefill", rows, len(rows), t0)
        return np.asarray(logits), {k: s.state_array(v) for k, v in state.items()}

    def _isolated(self, rows: list, call, what: str):
        """``call(rows)`` once for all of them; if that graph call fails, once per row, so that only the rows whose
        own call fails get the error (the others go on as if nothing happened). -> [(rows, result)]"""
        if len(rows) > 1:
            try:
                return [(rows, call(rows))]
            except Exception:  # any backend failure: ONNX Runtime, TensorRT, a BLS call
                self.retries += 1
        return self._alone(rows, call, what)

    def _alone(self, rows: list, call, what: str):
        """``call([row])`` for each row; a row whose call fails ends with that error. -> [([row], result)]"""
        out = []
        for r in rows:
            try:
                out.append(([r], call([r])))
            except Exception as e:
                self._fail(r.req, _row_error(what, r.req, e))
        return out

    def _join(self, newcomers: list[tuple[_Row, dict, int]]) -> None:
        """Put the newcomers' rows (``(row, state, index in state)``) into the running batch: each into a free slot
        when it fits there (its used length <= the batch's, per group: one row copied in place), the rest by
        rebuilding the batch once (every live row and newcomer copied, free slots dropped, unused columns trimmed)."""
        if not newcomers:
            return
        if self._state is None:
            self._rebuild(newcomers)
            return
        groups = self._groups()
        rest = []
        for row, state, i in newcomers:
            slot = next(iter(sorted(self._free_since)), None)
            align = self.session.state_align
            if slot is not None and all(used_columns(state[g][i], align) <= self._state[g].shape[1] for g in groups):
                with self.session.state_edit():
                    copy_row(groups, self._state, slot, state, i, align)
                self._rows[slot] = row
                del self._free_since[slot]
                self.joins["in_place"] += 1
            else:
                rest.append((row, state, i))
        if rest:
            self.joins["rebuild"] += 1
            self._rebuild([(r, self._state, j) for j, r in enumerate(self._rows) if r is not None] + rest)

    def _rebuild(self, parts: list[tuple[_Row, dict, int]]) -> None:
        """A new batch state holding exactly ``parts`` (row, source state, source row), each row right-aligned and
        every length axis as long as the longest row needs — one copy of each row."""
        self._rows = [p[0] for p in parts]
        self._free_since = {}
        if not parts:
            self._state = None
            return
        with self.session.state_edit():
            self._state = build_state(self.session, [(src, i) for _, src, i in parts])

    def _decode(self) -> None:
        slots = [j for j, r in enumerate(self._rows) if r is not None]
        live = [self._rows[j] for j in slots]
        tokens = np.array([r.next_token if r is not None else self.pad_id for r in self._rows], np.int64)
        t0 = time.perf_counter()
        try:
            logits, state = self.session.decode_step(self._state, tokens)
        except Exception:  # retried row by row: only the rows that fail alone get an error
            self.retries += 1
            self._decode_alone(slots)
            return
        self._log("decode", live, len(self._rows), t0)
        self._state = {k: self.session.state_array(v) for k, v in state.items()}
        keep = self._advance(live, np.asarray(logits)[slots])
        self._free([slots[j] for j in np.flatnonzero(~keep)])
        self._compact()

    def _decode_alone(self, slots: list[int]) -> None:
        """The batched step failed: step each live row by itself (its own state, compacted) and rebuild the batch
        from the rows that succeeded and go on."""
        with self.session.state_edit():
            parts = {id(self._rows[j]): (self._rows[j], build_state(self.session, [(self._state, j)])) for j in slots}

        def step(rows):
            row, state = parts[id(rows[0])]
            t0 = time.perf_counter()
            logits, new = self.session.decode_step(state, np.array([row.next_token], np.int64))
            self._log("decode", rows, 1, t0)
            return np.asarray(logits), {k: self.session.state_array(v) for k, v in new.items()}

        going = []
        for rows, (logits, state) in self._alone([self._rows[j] for j in slots], step, "decode"):
            if self._advance(rows, logits)[0]:
                going.append((rows[0], state, 0))
        self._rebuild(going)

    def _leave(self, idx: list[int], finish: str) -> None:
        for i in idx:
            self._end(self._rows[i].req, finish)
        self._free(idx)
        self._compact()

    def _free(self, slots: list[int]) -> None:
        """Finished rows leave at once; their slots stay (decoded but ignored) for newcomers to take over."""
        for j in slots:
            self._rows[j] = None
            self._free_since[j] = self.step_count
            for name, value in self._state.items():  # keep a free slot's per-row values valid (positions)
                if self.session.state_group_of(name)[0] is None:
                    value[j] = 0
        if not self._live():
            self._rows, self._state, self._free_since = [], None, {}

    def _compact(self) -> None:
        """Drop free slots nobody took within ``FREE_SLOT_STEPS`` steps, and columns no row needs once they are a
        quarter of the batch's length: one copy of the live rows (cheaper than decoding dead weight for long)."""
        if self._state is None:
            return
        stale = any(self.step_count - t >= FREE_SLOT_STEPS for t in self._free_since.values())
        if not stale:
            live = [j for j, r in enumerate(self._rows) if r is not None]
            s = self.session
            for g in self._groups():
                free, width = unused_columns(self._state[g], live, s.state_align), self._state[g].shape[1]
                stale = stale or (free - s.state_room(width - free)) * 4 >= width > 16

        if stale:
            self.joins["compact"] += 1
            self._rebuild([(r, self._state, j) for j, r in enumerate(self._rows) if r is not None])

    def _advance(self, rows: list[_Row], logits: np.ndarray) -> np.ndarray:
        """Choose each row's next token, emit its text, finish it if due. -> which rows go on. Whatever goes wrong
        with one row (NaN logits, its sampling, its text) ends that row alone."""
        keep = np.zeros(len(rows), bool)
        nxt, failed = choose([r.gen for r in rows], logits)
        for i, r in enumerate(rows):
            try:
                if i in failed:
                    raise failed[i]
                keep[i] = not self._take(r, int(nxt[i]))
            except Exception as e:  # this row's own problem: it ends, the batch goes on
                if r.req.t_done is None:
                    self._fail(r.req, NumericsError(f"{e} (task {r.req.task}); the bundle or the task's vectors are "
                                                    "broken") if isinstance(e, NumericsError) else
                               _row_error("sampling", r.req, e))
        return keep

    def _take(self, row: _Row, tok: int) -> bool:
        """Record one token for ``row`` and stream its text. -> True when the row is finished."""
        req = row.req
        self.tokens_generated += 1
        if req.t_first is None:
            req.t_first = time.perf_counter()
        delta = row.gen.take(tok)
        lp = row.gen.logprobs[-1] if row.gen.logprobs else None
        if delta is not None or lp is not None:  # every token but EOS (and EOS too when its logprob is asked)
            self._emit(req, "token", {"text": delta or "", "token": tok, "logprobs": lp})
        if row.gen.finish is None:
            row.next_token = tok
            return False
        req.text = row.gen.final_text(self.tokenizer)
        rest = row.gen.rest(req.text)
        if rest:
            self._emit(req, "token", {"text": rest, "token": None})
        self._end(req, row.gen.finish)
        return True

    def _end(self, req: Request, finish: str) -> None:
        req.finish, req.t_done = finish, time.perf_counter()
        self._emit(req, "done", req)

    def _fail(self, req: Request, exc: Exception) -> None:
        req.error, req.finish, req.t_done = exc, "error", time.perf_counter()
        self._emit(req, "error", exc)

    @staticmethod
    def _emit(req: Request, kind: str, data) -> None:
        if req.on_event is not None:
            try:
                req.on_event(kind, data)
            except Exception:  # a consumer that went away must not stop the scheduler
                pass

"""Continuous (iteration-level) batching over one session: every task shares the backbone's batches.

One engine thread owns the session's graph calls. Each iteration it

1. **admits** waiting requests into the running batch (up to ``max_batch`` rows), whatever their tasks, prompt
   lengths or sampling settings, and **prefills** them together in one graph call — for causal models each from its
   task's cached prompt KV, so a newcomer runs only its own tokens — which also yields their first token;
2. **joins** the newcomers to the running batch: a newcomer takes over the slot of a row that finished, copied in
   place (its keys/values right-aligned, zeros and mask 0 before them), when it fits the batch's length; otherwise
   the batch is rebuilt once — every live row and newcomer copied, right-aligned, left-padded to the longest need
   (explicit position ids keep each row's positions its own; T5's relative positions come from slot distances,
   which left padding keeps), so rows that joined at different times share one graph call;
3. runs **one decode step** for every slot, samples each live row with its own settings and generator, and lets
   finished rows (EOS, a stop string, ``max_new_tokens``, a cancelled request) leave at once: their requests end
   now, their slots wait a few steps for newcomers; a slot nobody takes, or columns no row needs any more (a
   quarter of the length), are dropped by one compaction copy.

Prefill and decode are separate graph calls: a prefill runs tens of tokens per row and a decode step one, and one
graph call over both would pad every running row to the newcomers' length. Copies of the whole batch state are
rare (a newcomer longer than the batch, a compaction); decoding costs what ``Session.generate`` costs per step,
plus, for a few steps, the rows of slots waiting for a newcomer.

A request's tokens at temperature 0 are what ``Session.generate`` gives for it alone (the batch layout does not
change a row's result); with a seed, row ``i`` of a request draws from the generator ``Session.generate`` gives row
``i``, so sampled requests equal it too. T5 bundles are batched the same way (the encoder runs in the prefill; its
cross-attention keys/values join the state).

The engine knows nothing of HTTP: ``submit`` a :class:`Request`, receive events through its ``on_event`` callback
(called from the engine thread), ``cancel`` it, ``drain`` and ``stop`` the engine.
"""

from __future__ import annotations

import collections
import threading
import time

import numpy as np

from ..errors import GenerationError, InputError, MptExportError, NumericsError
from ..runtime.sampling import SamplingConfig, check_stop, select
from ..runtime.streaming import TextStream, cut_at_stop
from .batchstate import build_state, copy_row, length_groups, unused_columns, used_columns
from .request import Draining, QueueFull, Request


class _Row:
    __slots__ = ("req", "cfg", "rng", "stream", "next_token")

    def __init__(self, req: Request, cfg: SamplingConfig, tokenizer, eos):
        self.req, self.cfg = req, cfg
        self.rng = cfg.generators(req.seed_row + 1)[req.seed_row] if not cfg.greedy else None
        self.stream = TextStream(tokenizer, req.stop, eos)
        self.next_token = None


def _as_numpy(v):
    return v if isinstance(v, np.ndarray) else v.numpy()


def _row_error(what: str, req: Request, e: Exception) -> Exception:
    """The error one row ends with: ours as they are, anything else (a backend's own exception) named and wrapped."""
    if isinstance(e, MptExportError):
        return e
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return GenerationError(f"the {what} graph call failed for this request alone (task {req.task}, "
                           f"{len(req.ids)} input tokens, {len(req.tokens)} generated): {type(e).__name__}: {first}")


FREE_SLOT_STEPS = 4  # a finished row's slot waits this many decode steps for a newcomer before the batch is compacted


class Engine:
    def __init__(self, session, max_batch: int = 16, max_queue: int = 256, step_log: int = 10000):
        if max_batch < 1 or max_queue < 1:
            raise InputError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.session = session
        self.max_batch, self.max_queue = int(max_batch), int(max_queue)
        limits = getattr(session, "limits", None)
        if limits is not None and limits.max_batch is not None:  # the backend cannot run more rows in one call
            self.max_batch = min(self.max_batch, limits.max_batch)
        self.tokenizer = session.tokenizer
        self.eos = session.eos_token_id
        self.pad_id = getattr(self.tokenizer, "pad_token_id", 0) or 0
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._cancel: set[str] = set()
        self._rows: list[_Row | None] = []  # None: a free slot (its row finished; decoded, ignored)
        self._free_since: dict[int, int] = {}  # free slot -> step it was freed
        self._state: dict | None = None
        self._layout: dict | None = None  # mask name -> [(state name, length axis)]
        self._accepting = True
        self._stopping = False
        self._admitting = 0
        self._thread: threading.Thread | None = None
        self.steps: collections.deque = collections.deque(maxlen=step_log)  # what ran in each graph call
        self.step_count = 0
        self.tokens_generated = 0
        self.joins = {"in_place": 0, "rebuild": 0, "compact": 0}  # how rows entered and left the batch
        self.retries = 0  # failed batched graph calls that were run again row by row

    # -- public ------------------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="mpt-export-engine", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """The engine thread is running (it stops only when told to, or when the process is failing)."""
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def check(self, req: Request) -> SamplingConfig:
        """The errors ``submit`` would raise for ``req`` (unknown task, too long, bad sampling values)."""
        cfg = SamplingConfig(req.max_new_tokens, req.temperature, req.top_k, req.top_p, req.seed)
        req.stop = check_stop(req.stop)
        self.session.check_request(len(req.ids), req.task, cfg.max_new_tokens)
        return cfg

    def submit(self, req: Request) -> Request:
        self.check(req)
        with self._cond:
            if not self._accepting:
                raise Draining("the server is shutting down and takes no new requests")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (the queue holds {self.max_queue}); "
                                "retry shortly")
            req.t_submit = time.perf_counter()
            self._waiting.append(req)
            self._cond.notify()
        return req

    def cancel(self, request_id: str) -> None:
        """Drop a request (waiting or running); its row leaves the batch at the next step."""
        with self._cond:
            self._cancel.add(request_id)
            self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    def idle(self) -> bool:
        return not self._waiting and not self._rows and not self._admitting

    def drain(self, timeout: float) -> bool:
        """Take no new requests; wait (up to ``timeout`` s) for the waiting and running ones to finish."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._accepting = False
            while not self.idle():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def stop(self) -> None:
        """Stop the engine thread; requests still waiting or running end as cancelled."""
        with self._cond:
            self._accepting = False
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # -- the loop ----------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._rows and not self._cancel:
                    self._cond.wait()
                if self._stopping:
                    leftover = list(self._waiting) + [r.req for r in self._live()]
                    self._waiting.clear()
                    break
                cancel, self._cancel = self._cancel, set()
                room = self.max_batch - self.running
                newcomers = []
                while room > 0 and self._waiting:
                    req = self._waiting.popleft()
                    if req.id in cancel:
                        self._end(req, "cancelled")
                        continue
                    newcomers.append(req)
                    room -= 1
                self._admitting = len(newcomers)  # neither waiting nor running yet: not idle
                for req in [r for r in self._waiting if r.id in cancel]:
                    self._waiting.remove(req)
                    self._end(req, "cancelled")
            if cancel:
                self._leave([i for i, row in enumerate(self._rows) if row is not None and row.req.id in cancel], "cancelled")
            try:
                if newcomers:
                    self._prefill(newcomers)
                if self._rows:
                    self._decode()
            except Exception as e:  # a bug in the engine itself (graph calls are isolated per row below)
                for row in self._live():
                    self._fail(row.req, e)
                for req in newcomers:
                    if req.t_done is None:
                        self._fail(req, e)
                self._rows, self._state, self._free_since = [], None, {}
            with self._cond:
                self._admitting = 0
                self._cond.notify_all()  # drain() waits on idleness
        for req in leftover:
            self._end(req, "cancelled")
        self._rows, self._state = [], None

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
                rows.append(_Row(req, self.check(req), self.tokenizer, self.eos))
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
        logits, state, _ = s.prefill(ids, [r.req.task for r in rows], mask)
        self._log("prefill", rows, len(rows), t0)
        return np.asarray(logits), {k: _as_numpy(v) for k, v in state.items()}

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
            if slot is not None and all(used_columns(state[g][i]) <= self._state[g].shape[1] for g in groups):
                copy_row(groups, self._state, slot, state, i)
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
        self._state = {k: _as_numpy(v) for k, v in state.items()}
        keep = self._advance(live, np.asarray(logits)[slots])
        self._free([slots[j] for j in np.flatnonzero(~keep)])
        self._compact()

    def _decode_alone(self, slots: list[int]) -> None:
        """The batched step failed: step each live row by itself (its own state, compacted) and rebuild the batch
        from the rows that succeeded and go on."""
        parts = {id(self._rows[j]): (self._rows[j], build_state(self.session, [(self._state, j)])) for j in slots}

        def step(rows):
            row, state = parts[id(rows[0])]
            t0 = time.perf_counter()
            logits, new = self.session.decode_step(state, np.array([row.next_token], np.int64))
            self._log("decode", rows, 1, t0)
            return np.asarray(logits), {k: _as_numpy(v) for k, v in new.items()}

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
            stale = any(unused_columns(self._state[g], live) * 4 >= self._state[g].shape[1] > 16
                        for g in self._groups())
        if stale:
            self.joins["compact"] += 1
            self._rebuild([(r, self._state, j) for j, r in enumerate(self._rows) if r is not None])

    def _advance(self, rows: list[_Row], logits: np.ndarray) -> np.ndarray:
        """Sample each row's next token, emit its text, finish it if due. -> which rows go on. Whatever goes wrong
        with one row (NaN logits, its sampling, its text) ends that row alone."""
        keep = np.zeros(len(rows), bool)
        finite = np.isfinite(logits).all(-1)
        greedy = [i for i, r in enumerate(rows) if r.cfg.greedy and finite[i]]
        nxt = np.zeros(len(rows), np.int64)
        if greedy:
            nxt[greedy] = logits[greedy].argmax(-1)
        for i, r in enumerate(rows):
            if not finite[i]:
                self._fail(r.req, NumericsError(
                    f"the model produced NaN or Inf logits at generation step {len(r.req.tokens)} (task "
                    f"{r.req.task}); the bundle or the task's vectors are broken"))
                continue
            try:
                if not r.cfg.greedy:
                    nxt[i] = select(logits[i:i + 1], r.cfg, [r.rng])[0]
                keep[i] = not self._take(r, int(nxt[i]))
            except Exception as e:  # this row's own problem: it ends, the batch goes on
                if r.req.t_done is None:
                    self._fail(r.req, _row_error("sampling", r.req, e))
        return keep

    def _take(self, row: _Row, tok: int) -> bool:
        """Record one token for ``row``. -> True when the row is finished."""
        req = row.req
        req.tokens.append(tok)
        self.tokens_generated += 1
        if req.t_first is None:
            req.t_first = time.perf_counter()
        finish = None
        if self.eos is not None and tok == self.eos:
            finish = "eos"
        else:
            delta = row.stream.push(tok)
            self._emit(req, "token", {"text": delta, "token": tok})  # every token: streams show progress
            if row.stream.stopped:
                finish = "stop"
        if finish is None and len(req.tokens) >= row.cfg.max_new_tokens:
            finish = "length"
        if finish is None:
            row.next_token = tok
            return False
        toks = req.tokens[:-1] if finish == "eos" else req.tokens
        text = cut_at_stop(self.tokenizer.decode(toks), req.stop)
        rest = row.stream.finish(text)
        if rest:
            self._emit(req, "token", {"text": rest, "token": None})
        req.text = text
        self._end(req, finish)
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
            except Exception:  # a consumer that went away must not stop the engine
                pass

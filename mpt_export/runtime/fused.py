"""Decoder-only models on the fused graph (``backbone_fast``, see ``export/fusedgraph.py``): the same session API and
step protocol as :class:`~.causal.CausalSession`, over GroupQueryAttention's cache layout.

State: ``past_key.{i}`` / ``past_value.{i}`` (B, KV, capacity, Dh) and ``kv_mask`` (B, capacity). Row b's keys and
values start at slot 0 (its task prompt, then its text; no padding inside) and ``kv_mask`` marks its slots — the
*left*-aligned layout (:attr:`state_align`), where the traced graph's is right-aligned. A decode step writes each
row's new keys/values into its next slot in place (past and present are one buffer, bound through IO binding), so
:meth:`decode_step` updates the state it is given and returns it; when a row reaches the capacity the buffers grow
once by :meth:`state_room` slots (amortized: no step reallocates the cache). A prefill runs the rows whose task
prompt KV is cached in one call and each missing prompt length in one more (right-padded chunks, the graph's
``query_seqlens``; a bundle written before that input runs a prefill row by row), a decode step the whole batch in
one call; rows never see each other, so a row's tokens do not depend on the batch (each step's logits are those the
row gets alone)."""

from __future__ import annotations

import numpy as np

from .causal import CausalSession
from .graphio import PAST, PRESENT, as_traced

GRAPH = "backbone_fast"  # the fused backbone's name among a session's graphs


class FusedCausalSession(CausalSession):
    """The fused graph's model kind. Its backend provides :meth:`_bind_in_place` and :meth:`_run_bound` (ONNX
    Runtime's IO binding: :class:`~.onnxruntime.OrtFusedSession`)."""

    GRAPH = GRAPH
    state_layout = {"kv_mask": (1, "kv_mask"), "past_key.*": (2, "kv_mask"), "past_value.*": (2, "kv_mask")}
    state_align = "left"
    graph = "fast"

    def __init__(self, bundle, options=None):
        super().__init__(bundle, options)
        cache = bundle.info.fused.past_inputs
        self._names = [s.name for s in cache]
        self._kv_heads, self._head_dim = int(cache[0].shape[1]), int(cache[0].shape[3])
        self._bound = None  # (ids of the state's arrays, the arrays, their binding): reused while they are the same
        # the graph takes query_seqlens: a padded batch of several new rows per sequence in one call (bundles
        # written before it: one sequence per call)
        self._query_lens = self._ragged = bundle.info.fused.input("query_seqlens") is not None

    # -- the backend interface this kind needs -------------------------------------------------------------------
    def _bind_in_place(self, graph: str, buffers: dict):
        """A binding of ``graph`` whose cache inputs and outputs are ``buffers`` (name -> host array), in place."""
        raise NotImplementedError

    def _run_bound(self, graph: str, binding, feed: dict) -> np.ndarray:
        """One call of ``graph`` through ``binding`` with the small inputs ``feed`` -> logits (B, V) float32."""
        raise NotImplementedError

    def _call(self, binding, ids, prompt, seqlens, last) -> np.ndarray:
        """One call of the fused graph: new ``ids`` (B, S), right-padded, after ``prompt`` rows (B, P, H) per
        sequence; ``seqlens`` (B,) each sequence's valid slots after the call minus one; ``last`` (B,) the index of
        its last real new row (its real new rows: ``last + 1``)."""
        feed = {"input_ids": ids, "prompt_embeds": prompt, "seqlens_k": seqlens.astype(np.int32),
                "total_sequence_length": np.array(int(seqlens.max()) + 1, np.int32),
                "last_index": last.astype(np.int64)}
        if self._query_lens:
            feed["query_seqlens"] = (last + 1).astype(np.int32)
        return self._run_bound(GRAPH, binding, feed)

    @staticmethod
    def state_room(n: int) -> int:
        """Free slots a buffer of ``n`` used ones gets when it is (re)allocated: steps until the next growth (below
        a quarter of the buffer, so the scheduler's compaction does not trim it straight away)."""
        return n // 8 + 8

    def _new_state(self, B: int, capacity: int) -> dict:
        # slots past a row's length are never read (its seqlens bound every attention), so they need no zeroing
        state = {n: np.empty((B, self._kv_heads, capacity, self._head_dim), self.dtype) for n in self._names}
        state["kv_mask"] = np.zeros((B, capacity), np.int64)
        return state

    def _prompt_kv(self, prompt: np.ndarray) -> dict[str, np.ndarray]:
        """A composed prompt's keys/values, {cache name: (KV, P, Dh)} (``task_kv`` caches them per task content)."""
        P = prompt.shape[0]
        arrays = {n: np.zeros((1, self._kv_heads, P, self._head_dim), self.dtype) for n in self._names}
        self._call(self._bind_in_place(GRAPH, arrays), np.zeros((1, 0), np.int64), prompt[None], np.array([P - 1]),
                   np.array([P - 1]))
        return {n: a[0] for n, a in arrays.items()}

    # -- the step protocol ---------------------------------------------------------------------------------------
    # A call costs about as much as this many padded positions of one row more (measured on the llama-small bench,
    # int8, 2 cores: a call of S positions for one row 7.5 ms + 0.8 ms x S), so rows of very different lengths go to
    # calls of their own rather than being padded to the longest.
    CALL_COST_TOKENS = 8

    @classmethod
    def _calls_by_length(cls, lengths: list[int]) -> list[list[int]]:
        """Indices of ``lengths`` (positions each row runs) split into runs of neighbours, each run a call of rows
        padded to its longest: fewest padded positions + ``CALL_COST_TOKENS`` per call. Neighbours, so a call's rows
        are one slice of the batch's buffers (no copies)."""
        best, cut = [0], [0]  # best[j]: the cost of the first j rows; cut[j]: where their last call starts
        for j in range(1, len(lengths) + 1):
            top, options = 0, []
            for i in range(j - 1, -1, -1):
                top = max(top, lengths[i])
                options.append((best[i] + cls.CALL_COST_TOKENS + top * (j - i), i))
            cost, at = min(options)
            best.append(cost)
            cut.append(at)
        calls, j = [], len(lengths)
        while j:
            calls.append(list(range(cut[j], j)))
            j = cut[j]
        return calls[::-1]

    def _start(self, ids, tasks, mask, use_cache, new_tokens=0):
        """The batch in as few calls as its task prompts and lengths allow -> (each row's last logits, the state,
        tokens processed). Rows whose task prompt KV is cached run together (its slots copied in, their ids after);
        a missing prompt runs in its row's call, with the other missing prompts of its length, and is kept for the
        task's other rows (and the cache). A call pads its rows' new ids at the end to the longest (rows of very
        different lengths go to calls of their own: :meth:`_calls_by_length`); the graph's ``query_seqlens`` keeps
        the padding out of the cache and out of every row's attention, so each row gets the numbers it gets alone (a
        bundle without that input runs one row per call). The buffers hold ``new_tokens`` more positions (or
        :meth:`state_room`'s), so a generation of known length never grows them."""
        B, S = ids.shape
        n = mask.sum(1).astype(np.int64)
        plens = np.array([self.prompt_len(t) for t in tasks], np.int64)
        groups: dict[int, list[int]] = {}  # prompt rows each call runs -> its rows (0: prompt KV copied in)
        kvs: dict[str, dict | None] = {}  # task -> its prompt KV ({} until its row's call computes it)
        later = []  # rows of a task whose prompt an earlier row of the batch computes: looked up after it has
        for b, t in enumerate(tasks):
            if t not in kvs:
                kvs[t] = self.cached_task_kv(t) if use_cache else None
                if kvs[t] is None:
                    kvs[t] = {} if use_cache else None
                    groups.setdefault(int(plens[b]), []).append(b)
                    continue
            elif kvs[t]:
                self.cached_task_kv(t)  # each request looks its task up once (the cache's hit count is per request)
            elif kvs[t] is not None:
                later.append(b)
            groups.setdefault(0 if kvs[t] is not None else int(plens[b]), []).append(b)
        calls = []  # (prompt rows, rows) per call: prompts first, their KV is copied into the rows that need it
        for P in sorted(groups, reverse=True):
            rows = groups[P]
            split = self._calls_by_length([int(n[b]) + P for b in rows]) if self._ragged else \
                [[i] for i in range(len(rows))]
            calls += [(P, np.array([rows[i] for i in part])) for part in split]
        # every call's padded chunk fits the state: a run of neighbouring rows then runs in the state itself
        need = max(int(plens[rows].max() if P == 0 else P) + int(n[rows].max()) for P, rows in calls)
        used = plens + n
        top = int(used.max())
        capacity = max(top + max(int(new_tokens), self.state_room(top)), need)
        state = self._new_state(B, capacity)
        logits = np.zeros((B, self.vocab_size), np.float32)
        processed = 0
        for P, rows in calls:
            w = int(n[rows].max())
            new = np.zeros((len(rows), w), np.int64)
            for i, b in enumerate(rows):
                new[i, : n[b]] = ids[b, S - n[b]:]
            past = np.zeros(len(rows), np.int64) if P else plens[rows]
            whole = rows[-1] - rows[0] == len(rows) - 1
            # neighbouring rows run in their slice of the state; others (missing prompts among cached ones) in
            # buffers of their own, sized to the call, their used slots copied into the state after
            bufs = {k: state[k][rows[0]: rows[-1] + 1] for k in self._names} if whole else \
                self._new_state(len(rows), int(past.max()) + P + w)
            if P:
                prompt = np.stack([self.task_prompt(tasks[b]) for b in rows])
            else:
                prompt = np.zeros((len(rows), 0, self.hidden_size), self.dtype)
                for b in later:
                    self.cached_task_kv(tasks[b])  # a hit now (or a miss if the cache could not keep it)
                later = []
                for i, b in enumerate(rows):
                    for name, a in kvs[tasks[b]].items():
                        bufs[name][i, :, : plens[b]] = a
            logits[rows] = self._call(self._bind_in_place(GRAPH, {k: bufs[k] for k in self._names}), new, prompt,
                                      past + P + n[rows] - 1, P + n[rows] - 1)
            if not whole:
                for i, b in enumerate(rows):
                    for k in self._names:
                        state[k][b, :, : used[b]] = bufs[k][i, :, : used[b]]
            for i, b in enumerate(rows if P else ()):
                kv = kvs[tasks[b]]
                if kv is not None and not kv:  # the task's prompt KV: a copy kept
                    kv.update({k: bufs[k][i, :, :P].copy() for k in self._names})
                    self.keep_task_kv(tasks[b], kv)
            processed += int(n[rows].sum()) + P * len(rows)
        state["kv_mask"][np.arange(state["kv_mask"].shape[1])[None] < used[:, None]] = 1
        return logits, state, processed

    def _step(self, state, tokens):
        lengths = state["kv_mask"].sum(1)
        need = int(lengths.max()) + 1
        if need > state["kv_mask"].shape[1]:
            state = self._grown(state, need + self.state_room(need))
        key = tuple(id(state[n]) for n in self._names)
        bound = self._bound  # one read: another thread stepping its own state may replace it meanwhile
        if bound is None or bound[0] != key:
            bound = self._bound = (key, [state[n] for n in self._names],
                                   self._bind_in_place(GRAPH, {n: state[n] for n in self._names}))
        b = len(tokens)
        logits = self._call(bound[2], np.asarray(tokens, np.int64)[:, None],
                            np.zeros((b, 0, self.hidden_size), self.dtype), lengths, np.zeros(b, np.int64))
        state["kv_mask"][np.arange(b), lengths] = 1
        return logits, state

    def _grown(self, state: dict, capacity: int) -> dict:
        new = self._new_state(state["kv_mask"].shape[0], capacity)
        for k, v in state.items():
            axis = self.state_group_of(k)[0]  # its length axis, as state_layout declares it
            new[k][(slice(None),) * axis + (slice(0, v.shape[axis]),)] = v
        return new

    def take_rows(self, value, keep):
        return np.ascontiguousarray(value[keep])

    def _score_feed(self, ids: np.ndarray, task: str) -> dict:
        """The scoring graph is the traced one: its feed in the traced layout, the past from this kind's cached
        prompt KV (the same keys and values, after rotary)."""
        kv = self.task_kv(task)
        P, S = next(iter(kv.values())).shape[1], ids.shape[1]
        feed = {"input_ids": ids, "prompt_embeds": np.zeros((1, 0, self.hidden_size), self.dtype),
                "attention_mask": np.ones((1, P + S), np.int64), "position_ids": np.arange(P, P + S)[None]}
        for name in kv:  # past_{kind}.{i} -> past_key_values.{i}.{kind}
            feed[as_traced(name, PAST)] = kv[name][None]
        return feed

    # -- outputs as the traced graph gives them (validation, ``logits``) ------------------------------------------
    def row_outputs(self, input_ids, tasks, attention_mask=None) -> list[dict]:
        """Per row: ``logits`` (1, V) at its last real id and ``present.{i}.key/value`` (1, KV, T, Dh) over its real
        positions (prompt + text), as PEFT computes them for the row alone — what validation compares."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        logits, state, _ = self._start(ids, tasks, mask, use_cache=False)
        out = []
        for b in range(ids.shape[0]):
            keep = state["kv_mask"][b] == 1
            row = {"logits": logits[b: b + 1]}
            for name in self._names:
                row[as_traced(name, PRESENT)] = state[name][b: b + 1][:, :, keep]
            out.append(row)
        return out

    def logits(self, input_ids, tasks, attention_mask=None) -> np.ndarray:
        """Last-position logits, np.float32 [batch, vocab] (no KV copied out, as ``forward`` does)."""
        ids, tasks, mask = self._check(input_ids, tasks, attention_mask)
        return self._start(ids, tasks, mask, use_cache=False)[0]

    def forward(self, input_ids, tasks, attention_mask=None) -> dict[str, np.ndarray]:
        """``logits`` (B, V) and ``present.{i}.key/value`` (B, KV, T, Dh): each row's prompt + text positions,
        right-aligned, zeros before (T: the longest row's)."""
        rows = self.row_outputs(input_ids, tasks, attention_mask)
        out = {"logits": np.concatenate([r["logits"] for r in rows])}
        for k in rows[0]:
            if k != "logits":
                T = max(r[k].shape[2] for r in rows)
                buf = np.zeros((len(rows), *rows[0][k].shape[1:2], T, rows[0][k].shape[3]), self.dtype)
                for b, r in enumerate(rows):
                    buf[b, :, T - r[k].shape[2]:] = r[k][0]
                out[k] = buf
        return out

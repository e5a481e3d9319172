"""Decoder-only models on the fused graph (``backbone_fast``, see ``export/fusedgraph.py``): the same session API and
step protocol as :class:`~.causal.CausalSession`, over GroupQueryAttention's cache layout.

State: ``past_key.{i}`` / ``past_value.{i}`` (B, KV, capacity, Dh) and ``kv_mask`` (B, capacity). Row b's keys and
values start at slot 0 (its task prompt, then its text; no padding inside) and ``kv_mask`` marks its slots — the
*left*-aligned layout (:attr:`state_align`), where the traced graph's is right-aligned. A decode step writes each
row's new keys/values into its next slot in place (past and present are one buffer, bound through IO binding), so
:meth:`decode_step` updates the state it is given and returns it; when a row reaches the capacity the buffers grow
once by :meth:`state_room` slots (amortized: no step reallocates the cache). A prefill runs row by row (the graph
takes several new ids over a cache for one sequence per call), a decode step runs the whole batch in one call;
rows never see each other, so a row's tokens do not depend on the batch (each step's logits are those the row gets
alone)."""

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

    # -- the backend interface this kind needs -------------------------------------------------------------------
    def _bind_in_place(self, graph: str, buffers: dict):
        """A binding of ``graph`` whose cache inputs and outputs are ``buffers`` (name -> host array), in place."""
        raise NotImplementedError

    def _run_bound(self, graph: str, binding, feed: dict) -> np.ndarray:
        """One call of ``graph`` through ``binding`` with the small inputs ``feed`` -> logits (B, V) float32."""
        raise NotImplementedError

    def _call(self, binding, ids, prompt, seqlens, last) -> np.ndarray:
        """One call of the fused graph: new ``ids`` (B, S) after ``prompt`` rows (B, P, H) per sequence; ``seqlens``
        (B,) each sequence's valid slots after the call minus one; ``last`` (B,) the index of its last new row.

        GroupQueryAttention takes several new rows over a cache one sequence per call unless it is given
        ``query_seqlens``, which the graph leaves out because it slows every decode step (~10% at batch 1,
        onnxruntime 1.32): so a prefill runs row by row, a decode step the whole batch at once."""
        return self._run_bound(GRAPH, binding, {
            "input_ids": ids, "prompt_embeds": prompt, "seqlens_k": seqlens.astype(np.int32),
            "total_sequence_length": np.array(int(seqlens.max()) + 1, np.int32), "last_index": last.astype(np.int64)})

    @staticmethod
    def state_room(n: int) -> int:
        """Free slots a buffer of ``n`` used ones gets when it is (re)allocated: steps until the next growth (below
        a quarter of the buffer, so the scheduler's compaction does not trim it straight away)."""
        return n // 8 + 8

    def _new_state(self, B: int, capacity: int) -> dict:
        state = {n: np.zeros((B, self._kv_heads, capacity, self._head_dim), self.dtype) for n in self._names}
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
    def _start(self, ids, tasks, mask, use_cache, new_tokens=0):
        """Each row alone: its task prompt's cached keys/values copied into its first slots (or the prompt run
        again), then its real ids; -> (each row's last logits, the state, tokens processed). The buffers hold
        ``new_tokens`` more positions (or :meth:`state_room`'s), so a generation of known length never grows them."""
        B = ids.shape[0]
        n = mask.sum(1)
        plens = [self.prompt_len(t) for t in tasks]
        used = [p + int(k) for p, k in zip(plens, n)]
        state = self._new_state(B, max(used) + max(int(new_tokens), self.state_room(max(used))))
        logits, processed = [], 0
        for b, t in enumerate(tasks):
            row = {k: v[b: b + 1] for k, v in state.items()}
            real = ids[b: b + 1, ids.shape[1] - int(n[b]):]
            kv = self.cached_task_kv(t) if use_cache else None
            if kv is not None:
                for name, a in kv.items():
                    row[name][0, :, : plens[b]] = a
                prompt = np.zeros((1, 0, self.hidden_size), self.dtype)
                last = int(n[b]) - 1
            else:  # the prompt runs with the row's ids, in the same call (a cache miss costs no call of its own)
                prompt = self.task_prompt(t)[None]
                last = used[b] - 1
                processed += plens[b]
            cache = self._bind_in_place(GRAPH, {n: row[n] for n in self._names})
            logits.append(self._call(cache, real, prompt, np.array([used[b] - 1]), np.array([last]))[0])
            if use_cache and kv is None:  # the prompt's slots are the task's prompt KV: keep a copy
                self.keep_task_kv(t, {name: row[name][0, :, : plens[b]].copy() for name in self._names})
            state["kv_mask"][b, : used[b]] = 1
            processed += int(n[b])
        return np.stack(logits), state, processed

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

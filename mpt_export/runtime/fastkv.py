"""Running the fast backbone (``export/fastgraph.py``) on ONNX Runtime: one buffer per layer for keys and one for
values, preallocated to ``(batch, KV, capacity, Dh)`` and updated in place by GroupQueryAttention — past and present
are bound through IO binding to the same memory, so no step allocates or copies the cache.

Each row's cache starts at slot 0 (its length in :attr:`FastBackbone.lengths`); a task prompt's keys/values are
computed once (:meth:`prompt_kv`) and copied into a row's first slots (:meth:`set_row`); :meth:`run` appends new
ids to every row and returns each row's last logits: a decode step (one id per row) in one call for the whole batch,
several ids per row (a prefill over a cached prompt) one row at a time — GroupQueryAttention refuses several new
rows over a cache for more than one sequence unless it is given ``query_seqlens``, which the graph leaves out because
it slows every decode step (~10% at batch 1, onnxruntime 1.32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import InputError


def bind_cache(session, values: dict):
    """An IO binding of ``session`` (the fast graph) with each ``past_*`` input and its ``present_*`` output bound to
    the same OrtValue (GroupQueryAttention then writes new keys/values in place), and ``logits`` to be allocated."""
    b = session.io_binding()
    b.bind_output("logits")
    for name, v in values.items():
        b.bind_ortvalue_input(name, v)
        b.bind_ortvalue_output(name.replace("past_", "present_"), v)
    return b


def run_bound(session, binding, ids, prompt, seqlens, last) -> np.ndarray:
    """One call of the fast graph through ``binding`` (:func:`bind_cache`): new ``ids`` (B, S) after ``prompt`` rows
    (B, P, H) per sequence; ``seqlens`` (B,) each sequence's valid slots after the call minus one; ``last`` (B,) the
    index of its last new row. -> logits (B, V) float32."""
    for name, a in (("input_ids", ids), ("prompt_embeds", prompt), ("seqlens_k", seqlens.astype(np.int32)),
                    ("total_sequence_length", np.array(int(seqlens.max()) + 1, np.int32)),
                    ("last_index", last.astype(np.int64))):
        binding.bind_cpu_input(name, np.ascontiguousarray(a))
    session.run_with_iobinding(binding)
    return binding.get_outputs()[0].numpy()


class FastBackbone:
    def __init__(self, path: str | Path, batch: int, capacity: int, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self._ort = ort
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.cache_names = [n for n in inputs if n.startswith("past_")]
        first = inputs[self.cache_names[0]]
        self.dtype = np.float16 if "float16" in first.type else np.float32
        self.kv_heads, self.head_dim = int(first.shape[1]), int(first.shape[3])
        self.hidden = int(inputs["prompt_embeds"].shape[2])
        self.batch, self.capacity = batch, capacity
        self.lengths = np.zeros(batch, np.int64)
        self._cache = {n: np.zeros((batch, self.kv_heads, capacity, self.head_dim), self.dtype)
                       for n in self.cache_names}
        self._values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self._cache.items()}  # same memory
        self._rows: dict[int, dict] = {}
        self._bindings: dict[int, object] = {}  # id(buffers) -> their IO binding (see _call)

    def _call(self, values: dict, ids, prompt, seqlens, last, keep: bool = True) -> np.ndarray:
        """One graph call over ``values`` (cache OrtValues). ``keep``: the buffers live as long as ``self`` (its own
        cache and row views), so their binding is made once and kept; each call rebinds only the small inputs."""
        b = self._bindings.get(id(values)) if keep else None
        if b is None:
            b = bind_cache(self.session, values)
            if keep:
                self._bindings[id(values)] = b
        return run_bound(self.session, b, ids, prompt, seqlens, last)

    def prompt_kv(self, prompt: np.ndarray) -> dict[str, np.ndarray]:
        """A task prompt's (P, H) rows -> its keys/values, {cache name: (KV, P, Dh)} (positions 0..P-1)."""
        P = prompt.shape[0]
        arrays = {n: np.zeros((1, self.kv_heads, P, self.head_dim), self.dtype) for n in self.cache_names}
        values = {n: self._ort.OrtValue.ortvalue_from_numpy(a) for n, a in arrays.items()}
        self._call(values, np.zeros((1, 0), np.int64), prompt[None].astype(self.dtype), np.array([P - 1]),
                   np.array([P - 1]), keep=False)
        return {n: a[0] for n, a in arrays.items()}

    def set_row(self, row: int, kv: dict[str, np.ndarray]) -> None:
        """Row ``row`` starts over from ``kv`` (a :meth:`prompt_kv`): its first slots, its length."""
        P = next(iter(kv.values())).shape[1]
        if P > self.capacity:
            raise InputError(f"a prompt of {P} positions does not fit a cache of {self.capacity}")
        for n, a in kv.items():
            self._cache[n][row, :, :P] = a
        self.lengths[row] = P

    def run(self, ids: np.ndarray, real: np.ndarray) -> np.ndarray:
        """Append a chunk to every row: ``ids`` (batch, S) right-padded, ``real`` (batch,) real ids per row (>= 1)
        -> each row's logits at its last real id, float32 (batch, vocab)."""
        B, S = ids.shape
        if B != self.batch or np.any(real < 1) or np.any(real > S):
            raise InputError(f"a chunk of {B} rows of 1..{S} ids for a cache of {self.batch} rows")
        if np.any(self.lengths + S > self.capacity):
            raise InputError(f"{int((self.lengths + S).max())} positions do not fit a cache of {self.capacity}")
        if S == 1:  # a decode step: every row at once
            logits = self._call(self._values, ids.astype(np.int64), np.zeros((B, 0, self.hidden), self.dtype),
                                self.lengths, np.zeros(B, np.int64))
        else:  # GroupQueryAttention takes several new rows over a cache one sequence at a time (its row's memory)
            logits = np.stack([self._call(self._row_values(b), ids[b: b + 1, : real[b]].astype(np.int64),
                                          np.zeros((1, 0, self.hidden), self.dtype),
                                          self.lengths[b: b + 1] + real[b] - 1, real[b: b + 1] - 1)[0]
                               for b in range(B)])
        self.lengths += real
        return logits

    def _row_values(self, row: int) -> dict:
        """OrtValues over row ``row`` of every buffer (the same memory: a first-axis slice is contiguous)."""
        if row not in self._rows:
            self._rows[row] = {n: self._ort.OrtValue.ortvalue_from_numpy(a[row: row + 1]) for n, a in self._cache.items()}
        return self._rows[row]

"""Calling the fast backbone (``export/fastgraph.py``) on ONNX Runtime over its in-place cache: one buffer per layer
for keys and one for values, ``(B, KV, capacity, Dh)``, updated in place by GroupQueryAttention — past and present
are bound through IO binding to the same memory, so no step allocates or copies the cache. The session that keeps
these buffers, grows them and decides what each call runs is :class:`~.fastcausal.FastCausalSession`.

A decode step (one id per row) runs the whole batch in one call; several ids per row (a prefill over a cached
prompt) run one row at a time — GroupQueryAttention refuses several new rows over a cache for more than one sequence
unless it is given ``query_seqlens``, which the graph leaves out because it slows every decode step (~10% at batch
1, onnxruntime 1.32)."""

from __future__ import annotations

import numpy as np


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


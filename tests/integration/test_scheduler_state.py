"""The scheduler edits a running batch's decode state only through the session (``state_array``, ``state_zeros``,
``take_rows``, ``state_edit``), so a backend that keeps keys and values off the host — TensorRT's CUDA tensors —
runs under it. Proven with a real ONNX Runtime session whose step outputs are handed back as torch tensors (numpy
cannot be assigned into them, nor they sliced like numpy): staggered rows that join, leave and get compacted give
the tokens each row gets alone."""

from __future__ import annotations

import numpy as np

import mpt_export
from support import serve_all, solo
from mpt_export.scheduler.batching import Scheduler
from mpt_export.runtime.onnxruntime import OrtCausalSession


class TorchStateSession(OrtCausalSession):
    """Keys and values between steps are torch tensors (as a device backend's would be device tensors)."""

    def __init__(self, bundle):
        import torch

        self.torch = torch
        super().__init__(bundle, mpt_export.runtime.SessionOptions(io_binding=False, graph="plain"))
        self.kinds = set()

    def _run_step_impl(self, graph, feed):
        host = {k: v.numpy() if isinstance(v, self.torch.Tensor) else v for k, v in feed.items()}
        out = super()._run_step_impl(graph, host)
        return {k: v if k == "logits" else self.torch.from_numpy(np.ascontiguousarray(v)) for k, v in out.items()}

    def state_array(self, value):
        return value  # not turned into numpy: the scheduler must cope

    def state_zeros(self, like, shape):
        if isinstance(like, self.torch.Tensor):
            return self.torch.zeros(tuple(shape), dtype=like.dtype)
        return np.zeros(shape, like.dtype)

    def take_rows(self, value, keep):
        if isinstance(value, self.torch.Tensor):
            return value.index_select(0, self.torch.as_tensor(np.flatnonzero(keep)))
        return value[keep]

    def decode_step(self, state, tokens):
        self.kinds |= {type(v).__name__ for k, v in state.items() if k.startswith("past_")}
        return super().decode_step(state, tokens)


def test_the_engine_runs_a_session_whose_state_is_not_numpy(make_case):
    b = mpt_export.load_bundle(make_case("llama").bundle)
    s = TorchStateSession(b)
    rng = np.random.default_rng(7)
    vocab = b.info.base_model.vocab_size
    jobs = [dict(task=b.tasks[i % len(b.tasks)], ids=rng.integers(3, vocab, int(rng.integers(2, 12))).tolist(),
                 max_new_tokens=int(rng.integers(1, 12)), temperature=0.0, top_k=0, seed=None) for i in range(12)]
    scheduler = Scheduler(s, max_batch=3, max_queue=32).start()
    try:
        reqs = serve_all(scheduler, jobs)
    finally:
        scheduler.stop()
    assert [r.error for r in reqs] == [None] * len(reqs)
    assert s.kinds == {"Tensor"}  # every decode step got torch keys/values, never numpy
    plain = b.session(graph="plain")
    assert [r.tokens for r in reqs] == [solo(plain, j) for j in jobs]
    assert scheduler.joins["in_place"] > 0 and scheduler.joins["rebuild"] > 0, scheduler.joins

"""`mpt-export triton`: the Python-backend generation model's logic run against the bundle through ONNX Runtime (in
process, and through BLS calls answered from the repository's own graph models) and compared with Session.generate
token for token; limits refused at admission; the model.py Triton loads, run with a stand-in of its backend utils.
(The repository itself: test_triton_repository.py.)"""

from __future__ import annotations

import json
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient")
pytest.importorskip("grpc")
from tritonclient.grpc import model_config_pb2 as pb  # noqa: E402

import mpt_export  # noqa: E402
from triton_config import parse  # noqa: E402

PROMPTS = ["the cat sat", "once upon a time", "hello", "a b c d e f"]


# -- the generation model's logic --------------------------------------------------------------------------------------

def _inputs(task, text, max_tokens=6, stream=False, **kw):
    x = {"text_input": np.array([text.encode()], dtype=object), "task": np.array([task.encode()], dtype=object),
         "max_tokens": np.array([max_tokens], np.int32), "stream": np.array([stream])}
    for k, v in kw.items():
        x[k] = np.array([v])
    return x


def _run_all(gen, jobs, timeout=120):
    """Submit every job at once (they share the scheduler's batches); -> per job: (responses, error)."""
    results = [{"responses": [], "error": None, "done": threading.Event()} for _ in jobs]

    def sender(i):
        def send(outputs, final, error):
            if error is not None:
                results[i]["error"] = error
            elif outputs is not None:
                results[i]["responses"].append(outputs)
            if final:
                results[i]["done"].set()
        return send

    for i, job in enumerate(jobs):
        gen.submit(job, sender(i))
    for r in results:
        assert r["done"].wait(timeout), "no final response"
    return results


def _check_equal(gen, bundle_dir, stream_too=True):
    b = mpt_export.load_bundle(bundle_dir)
    s = b.session()
    tasks = b.tasks
    jobs = [(tasks[i % len(tasks)], PROMPTS[i % len(PROMPTS)], bool(stream_too and i % 3 == 0)) for i in range(10)]
    results = _run_all(gen, [_inputs(t, p, stream=st) for t, p, st in jobs])
    for (t, p, st), r in zip(jobs, results):
        assert r["error"] is None, r["error"]
        ids, mask = s.tokenizer.encode_batch([p], padding=s.padding_side)
        res = s.generate_detailed(ids, [t], mask, max_new_tokens=6)
        want_ids = [int(x) for x in res.ids[0][:int(res.lengths[0])]]
        if res.finish[0] == "eos":
            want_ids = want_ids[:-1]
        want_text = s.generate([p], [t], max_new_tokens=6)[0]
        resp = r["responses"]
        got_ids = [int(x) for o in resp for x in o["output_ids"]]
        got_text = "".join(o["text_output"][0].decode() for o in resp)
        assert got_ids == want_ids and got_text == want_text, (t, p, st)
        assert resp[-1]["finish_reason"][0].decode() in ("stop", "length")
        if st:
            assert len(resp) >= 2  # token responses, then the final one
    s.close()
    b.close()
    return results


def test_generation_in_process_equals_session(repo):
    from mpt_export.serving.triton.generate import TritonGeneration

    out, _ = repo
    bundle_dir = out / "generate" / "1" / "bundle"
    gen = TritonGeneration(bundle_dir, max_batch=4)
    try:
        _check_equal(gen, bundle_dir)
        assert max(step["batch"] for step in gen.scheduler.steps) > 1  # requests shared graph calls
        # bad requests: one final error each, the scheduler keeps serving
        bad = [_inputs("nope", "hi"), {"task": np.array([b"a"], dtype=object)},
               _inputs("a", "hi", max_tokens=10_000), dict(_inputs("a", "hi"), text_input=np.array([b"\xff\xfe"], dtype=object))]
        res = _run_all(gen, bad)
        assert "nope" in res[0]["error"] and "text_input" in res[1]["error"] and "positions" in res[2]["error"]
        assert "UTF-8" in res[3]["error"]
        assert not any(r["responses"] for r in res)
        _check_equal(gen, bundle_dir, stream_too=False)  # still serving
    finally:
        gen.close()


def test_a_weight_only_bundle_is_served_by_onnxruntime_not_tensorrt(llama, tmp_path):
    """An int4 bundle's repository (ONNX Runtime backend) generates what the bundle's session does; Triton's TensorRT
    backend cannot read MatMulNBits, so it is refused before anything is written."""
    from mpt_export.export.quantize import quantize_bundle
    from mpt_export.serving.triton.generate import TritonGeneration
    from mpt_export.serving.triton.writer import write_repository
    from support import assert_clean_failure, cli, no_output_left

    q = quantize_bundle(llama.bundle, tmp_path / "int4", scheme="int4", min_agreement=0.0)
    out = tmp_path / "repo"
    write_repository(q.path, out, max_batch=4)
    assert parse(out / "backbone" / "config.pbtxt").platform == "onnxruntime_onnx"
    bundle_dir = out / "generate" / "1" / "bundle"
    assert mpt_export.load_bundle(bundle_dir).manifest["quantization"]["scheme"] == "int4"
    gen = TritonGeneration(bundle_dir, max_batch=4)
    try:
        _check_equal(gen, bundle_dir, stream_too=False)
    finally:
        gen.close()
    bad = tmp_path / "trt"
    assert_clean_failure(cli("triton", q.path, "--out", bad, "--backend", "tensorrt", "--kind", "gpu"),
                         "is a int4 bundle", "TensorRT cannot read its graphs", "--backend onnxruntime")
    assert no_output_left(bad)


class _StandIn:
    """Answers BLS calls from the repository's graph models the way Triton would: each request checked against the
    model's config.pbtxt (names, dtypes, dims with the batch axis, max_batch_size), then run by ONNX Runtime on the
    model's own files. (A stand-in for Triton's server, which cannot run here; not for the code under test.)"""

    NP = {"TYPE_FP32": np.float32, "TYPE_INT64": np.int64, "TYPE_FP16": np.float16, "TYPE_INT32": np.int32}

    def __init__(self, root: Path):
        import onnxruntime as ort

        self.models = {}
        for d in root.iterdir():
            if not (d / "config.pbtxt").is_file():
                continue
            cfg = parse(d / "config.pbtxt")
            if cfg.backend != "onnxruntime":
                continue
            path = d / "1" / "model.onnx"
            path = path / "model.onnx" if path.is_dir() else path
            self.models[d.name] = (cfg, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model, feed, output_names):
        cfg, sess = self.models[model]
        ins = {t.name: t for t in cfg.input}
        assert set(feed) == set(ins), (model, sorted(set(feed) ^ set(ins)))
        batch = {v.shape[0] for v in feed.values()}
        assert len(batch) == 1 and 1 <= batch.pop() <= cfg.max_batch_size, model
        for k, v in feed.items():
            t = ins[k]
            assert v.dtype == self.NP[pb.DataType.Name(t.data_type)], (model, k, v.dtype)
            assert v.ndim == len(t.dims) + 1 and all(d == -1 or d == n for d, n in zip(t.dims, v.shape[1:])), (k, v.shape)
        outs = {t.name for t in cfg.output}
        assert set(output_names) <= outs
        self.calls.append((model, next(iter(feed.values())).shape[0]))
        return dict(zip(output_names, sess.run(list(output_names), feed)))


def test_generation_through_bls_equals_session(repo):
    from mpt_export.serving.triton.generate import TritonGeneration

    out, _ = repo
    standin = _StandIn(out)
    gen = TritonGeneration(out / "generate" / "1" / "bundle", graph_calls="bls", bls=standin, max_batch=4,
                           models={"backbone": "backbone", "composer": "composer"})
    try:
        _check_equal(gen, out / "generate" / "1" / "bundle", stream_too=False)
    finally:
        gen.close()
    assert {m for m, _ in standin.calls} == {"backbone", "composer"}
    assert max(n for m, n in standin.calls if m == "backbone") > 1


def test_bls_limits_refused_at_admission(repo):
    """The graph models' limits (Triton's max_batch_size; TensorRT plans' profile maxima from the repository's
    engine_limits) are checked when a request arrives: a request beyond them gets one final error at once, naming
    the limit, and never reaches a batch — the requests beside it are served as usual."""
    from mpt_export.serving.triton.generate import TritonGeneration

    out, _ = repo
    standin = _StandIn(out)
    gen = TritonGeneration(out / "generate" / "1" / "bundle", graph_calls="bls", bls=standin, max_batch=4,
                           models={"backbone": "backbone", "composer": "composer"},
                           engine_limits={"max_batch": 8, "max_input": 6, "max_new_tokens": 5})
    try:
        assert gen.scheduler.max_batch == 4  # Triton's max_batch_size is the tighter one
        long_text = " ".join(["word"] * 40)
        res = _run_all(gen, [_inputs("a", long_text, max_tokens=3), _inputs("a", "hi", max_tokens=6),
                             _inputs("b", "hi", max_tokens=5)])
        assert "max_input" in res[0]["error"] and "TensorRT plans" in res[0]["error"], res[0]["error"]
        assert "max_new_tokens" in res[1]["error"], res[1]["error"]
        assert res[2]["error"] is None and res[2]["responses"]
        assert not res[0]["responses"] and not res[1]["responses"]
        seen = [n for m, n in standin.calls if m == "backbone"]
        assert seen and max(seen) <= 4
    finally:
        gen.close()


def test_model_py_adapter(repo, monkeypatch):
    """The model.py Triton loads, run with a small stand-in of ``triton_python_backend_utils`` (the names it uses are
    those of Triton's Python backend): a decoupled stream of responses, the last flagged final. As in Python backend,
    a request's response factory is freed with its final response: the stand-in records any later use of the request
    (a cancellation check, another response) while the watcher polls as fast as it can."""
    out, _ = repo
    FINAL = 1
    misuse = []

    class Tensor:
        def __init__(self, name, value):
            self._name, self._value = name, np.asarray(value)

        def name(self):
            return self._name

        def as_numpy(self):
            return self._value

    class Request:
        def __init__(self, inputs, cancel_after=None):
            self.inputs, self.sent, self.cancel_after = inputs, [], cancel_after
            self.done = threading.Event()

        def is_cancelled(self):  # as Triton reports a client's cancellation: True once cancelled
            time.sleep(0.001)  # an IPC round trip
            if self.done.is_set():
                misuse.append("is_cancelled after the final response (freed response factory)")
            return self.cancel_after is not None and len(self.sent) >= self.cancel_after

        def get_response_sender(self):
            req = self

            class Sender:
                def send(self, response=None, flags=0):
                    if req.done.is_set():
                        misuse.append("a response after the final one")
                    time.sleep(0.001)  # an IPC round trip: room for the watcher to interleave
                    req.sent.append((response, flags))
                    if req.cancel_after is not None and len(req.sent) == req.cancel_after:
                        model._check_cancelled()  # the watcher's pass, at this moment (the thread polls it)
                    if flags & FINAL:
                        req.done.set()
            return Sender()

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    pb_utils = types.SimpleNamespace(
        Tensor=Tensor, InferenceResponse=InferenceResponse, TritonError=lambda msg: ("error", msg),
        TRITONSERVER_RESPONSE_COMPLETE_FINAL=FINAL,
        get_input_tensor_by_name=lambda r, n: Tensor(n, r.inputs[n]) if n in r.inputs else None)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb_utils)
    import importlib.util

    spec = importlib.util.spec_from_file_location("triton_model_under_test", out / "generate" / "1" / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = parse(out / "generate" / "config.pbtxt")
    from google.protobuf import json_format

    monkeypatch.setattr(mod, "CANCEL_POLL_S", 0.0005)  # the watcher polls as often as it can
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                      "model_repository": str(out / "generate"), "model_version": "1"})
    try:
        reqs = [Request(_inputs("b", "hello", stream=True)), Request(_inputs("c", "it was")),
                Request(_inputs("zzz", "x")), Request(_inputs("a", "hello", max_tokens=40, stream=True), cancel_after=3)]
        assert model.execute(reqs) is None  # decoupled: responses come from the scheduler thread
        for r in reqs:
            assert r.done.wait(60)
        b = mpt_export.load_bundle(out / "generate" / "1" / "bundle")
        s = b.session()
        streamed = "".join(t.as_numpy()[0].decode() for resp, _ in reqs[0].sent for t in resp.output_tensors
                           if t.name() == "text_output")
        assert streamed == s.generate(["hello"], ["b"], max_new_tokens=6)[0]
        assert len(reqs[0].sent) > 2 and [f for _, f in reqs[0].sent][-1] == FINAL
        whole = {t.name(): t.as_numpy() for t in reqs[1].sent[0][0].output_tensors}
        assert whole["text_output"][0].decode() == s.generate(["it was"], ["c"], max_new_tokens=6)[0]
        assert len(reqs[2].sent) == 1 and reqs[2].sent[0][0].error[0] == "error" and "zzz" in reqs[2].sent[0][0].error[1]
        last = {t.name(): t.as_numpy() for t in reqs[3].sent[-1][0].output_tensors}
        assert last["finish_reason"][0] == b"cancelled" and len(reqs[3].sent) < 40  # left the batch early
        many = [Request(_inputs("abc"[i % 3], "hi", max_tokens=1 + i % 3, stream=i % 2 == 0)) for i in range(24)]
        model.execute(many)
        assert all(r.done.wait(60) for r in many)
        time.sleep(0.05)  # the watcher's passes after the last final response
        assert misuse == []
        s.close()
        b.close()
    finally:
        model.finalize()

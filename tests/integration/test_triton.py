"""`mpt-export triton`: the model repository checked offline (Triton's server cannot be installed here) — every
config parsed into Triton's own ModelConfig protobuf and compared with the ONNX graphs, the layout Triton loads,
the rules Triton enforces; the Python-backend model's logic run against the bundle through ONNX Runtime (in
process, and through BLS calls answered from the repository's own graph models) and compared with
Session.generate token for token; bad input refused with nothing written."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tritonclient")
pytest.importorskip("grpc")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2 as pb  # noqa: E402

import mpt_export  # noqa: E402
from support import cli  # noqa: E402
from mpt_export.serving.triton.writer import write_repository  # noqa: E402
from mpt_export.serving.triton.check import ONNX_TO_TRITON, check_model, check_repository  # noqa: E402

PROMPTS = ["the cat sat", "once upon a time", "hello", "a b c d e f"]


def parse(path: Path):
    cfg = pb.ModelConfig()
    text_format.Parse(path.read_text(), cfg)
    return cfg


def onnx_io(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {(side, v.name): (ONNX_TO_TRITON[v.type.tensor_type.elem_type], len(v.type.tensor_type.shape.dim))
            for side, vs in (("input", m.graph.input), ("output", m.graph.output)) for v in vs}


@pytest.fixture(scope="module")
def repo(llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repo"
    r = write_repository(llama.bundle, out, max_batch=4, max_queue=32)
    return out, r


def test_repository_layout_and_configs(llama, repo):
    out, r = repo
    b = mpt_export.load_bundle(llama.bundle)
    assert sorted(r["models"]) == ["backbone", "composer", "generate"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["backbone", "composer", "generate"]
    # the layout Triton loads: <model>/config.pbtxt, <model>/1/model.onnx (a directory when it has external data)
    assert (out / "composer" / "1" / "model.onnx").is_file()
    assert (out / "backbone" / "1" / "model.onnx" / "model.onnx").is_file()
    data = b.manifest["graphs"]["backbone"]["external_data"]
    placed = out / "backbone" / "1" / "model.onnx" / data
    # one copy in the repository (the generation model's bundle links to it); the user's bundle is never linked
    assert os.stat(placed).st_ino == os.stat(out / "generate" / "1" / "bundle" / data).st_ino
    assert os.stat(b.path / data).st_nlink == 1 and r["copied"] + r["cloned"] == len(b.manifest["files"]) + 1
    assert placed.read_bytes() == (b.path / data).read_bytes()
    import onnx

    onnx.load(str(b.path / "backbone.onnx"), load_external_data=True)  # ONNX-reading commands still take the bundle
    assert (out / "generate" / "1" / "model.py").is_file()
    for name in ("backbone", "composer"):
        cfg = parse(out / name / "config.pbtxt")
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx" and cfg.backend == "onnxruntime"
        assert cfg.max_batch_size == 4
        assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 32
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, pb.ModelInstanceGroup.Kind.KIND_CPU)]
        path = out / name / "1" / "model.onnx"
        io = onnx_io(path / "model.onnx" if path.is_dir() else path)
        have = {("input", t.name): t for t in cfg.input} | {("output", t.name): t for t in cfg.output}
        assert set(have) == set(io)  # same names, nothing missing or extra
        for key, (dtype, rank) in io.items():
            t = have[key]
            assert pb.DataType.Name(t.data_type) == dtype, key
            assert len(t.dims) == rank - 1, key  # the batch axis stays out of dims (max_batch_size > 0)
        spec = b.manifest["graphs"][name]
        for s in spec["inputs"] + spec["outputs"]:  # fixed sizes from the manifest
            t = have[("input" if s in spec["inputs"] else "output", s["name"])]
            assert list(t.dims) == [d if isinstance(d, int) else -1 for d in s["shape"][1:]]
    gen = parse(out / "generate" / "config.pbtxt")
    assert gen.backend == "python" and gen.model_transaction_policy.decoupled and gen.max_batch_size == 0
    assert [t.name for t in gen.output] == ["text_output", "output_ids", "finish_reason"]
    assert gen.parameters["graph_calls"].string_value == "onnxruntime"
    # the generation model's bundle is whole and verifies
    mpt_export.load_bundle(out / "generate" / "1" / "bundle", trust_stamp=False).close()
    assert check_repository(out, b, {"backbone": "backbone", "composer": "composer"}) == []
    b.close()


def test_t5_shared_weights_in_each_model_dir(make_case, tmp_path):
    case = make_case("t5", 2)
    out = tmp_path / "repo"
    write_repository(case.bundle, out)
    b = mpt_export.load_bundle(case.bundle)
    graphs = b.manifest["graphs"]
    assert {"encoder", "decoder"} <= set(graphs)
    inodes = set()
    for g in ("encoder", "decoder"):
        data = graphs[g]["external_data"]
        f = out / g / "1" / "model.onnx" / data
        assert f.is_file() and os.stat(b.path / data).st_nlink == 1
        inodes.add(os.stat(f).st_ino)
        cfg = parse(out / g / "config.pbtxt")
        assert {t.name for t in cfg.input} == {s["name"] for s in graphs[g]["inputs"]}
    assert len(inodes) == 1  # one copy of the shared weights, linked into both model directories
    assert check_repository(out, b) == []
    b.close()


def _mutated(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst, copy_function=os.link)
    cfg = dst / "config.pbtxt"
    text = cfg.read_text()
    cfg.unlink()
    new = edit(text)
    assert new != text, "the edit did not apply"
    cfg.write_text(new)
    return dst


def test_checker_rejects_what_triton_would(repo, tmp_path, llama):
    out, _ = repo
    b = mpt_export.load_bundle(llama.bundle)
    spec = b.manifest["graphs"]["backbone"]
    cases = {
        "batch axis in dims": lambda t: t.replace('name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ]',
                                                  'name: "input_ids" data_type: TYPE_INT64 dims: [ -1, -1 ]'),
        "wrong dtype": lambda t: t.replace('"attention_mask" data_type: TYPE_INT64', '"attention_mask" data_type: TYPE_INT32'),
        "unbounded queue": lambda t: t.replace("max_queue_size: 32", "max_queue_size: 0"),
        "name": lambda t: t.replace('name: "backbone"', 'name: "other"'),
        "renamed input": lambda t: t.replace('"position_ids"', '"positions"'),
        "zero dim": lambda t: re.sub(r'(past_key_values\.0\.key" data_type: TYPE_FP32 dims: \[ )\d+', r"\g<1>0", t),
        "fixed size": lambda t: re.sub(r'(past_key_values\.0\.key" data_type: TYPE_FP32 dims: \[ )\d+', r"\g<1>99", t),
        "tensorrt on cpu": lambda t: t.replace('platform: "onnxruntime_onnx"\nbackend: "onnxruntime"',
                                               'platform: "tensorrt_plan"\nbackend: "tensorrt"'),
    }
    for label, edit in cases.items():
        d = _mutated(out / "backbone", tmp_path / label.replace(" ", "_") / "backbone", edit)
        assert check_model(d, spec), f"{label}: not caught"
    gen = _mutated(out / "generate", tmp_path / "gen" / "generate",
                   lambda t: t.replace("model_transaction_policy { decoupled: true }\n", ""))
    assert any("decoupled" in p for p in check_model(gen))
    # external data missing beside model.onnx
    d = tmp_path / "nodata" / "backbone"
    shutil.copytree(out / "backbone", d, copy_function=os.link)
    (d / "1" / "model.onnx" / spec["external_data"]).unlink()
    assert any("external data" in p for p in check_model(d, spec))
    b.close()


# -- the generation model's logic --------------------------------------------------------------------------------------
def _inputs(task, text, max_tokens=6, stream=False, **kw):
    x = {"text_input": np.array([text.encode()], dtype=object), "task": np.array([task.encode()], dtype=object),
         "max_tokens": np.array([max_tokens], np.int32), "stream": np.array([stream])}
    for k, v in kw.items():
        x[k] = np.array([v])
    return x


def _run_all(gen, jobs, timeout=120):
    """Submit every job at once (they share the engine's batches); -> per job: (responses, error)."""
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
        assert max(step["batch"] for step in gen.engine.steps) > 1  # requests shared graph calls
        # bad requests: one final error each, the engine keeps serving
        bad = [_inputs("nope", "hi"), {"task": np.array([b"a"], dtype=object)},
               _inputs("a", "hi", max_tokens=10_000), dict(_inputs("a", "hi"), text_input=np.array([b"\xff\xfe"], dtype=object))]
        res = _run_all(gen, bad)
        assert "nope" in res[0]["error"] and "text_input" in res[1]["error"] and "positions" in res[2]["error"]
        assert "UTF-8" in res[3]["error"]
        assert not any(r["responses"] for r in res)
        _check_equal(gen, bundle_dir, stream_too=False)  # still serving
    finally:
        gen.close()


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
        assert gen.engine.max_batch == 4  # Triton's max_batch_size is the tighter one
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
    those of Triton's Python backend): a decoupled stream of responses, the last flagged final."""
    out, _ = repo
    FINAL = 1

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
            return self.cancel_after is not None and len(self.sent) >= self.cancel_after

        def get_response_sender(self):
            req = self

            class Sender:
                def send(self, response=None, flags=0):
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

    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                      "model_repository": str(out / "generate"), "model_version": "1"})
    try:
        reqs = [Request(_inputs("b", "hello", stream=True)), Request(_inputs("c", "it was")),
                Request(_inputs("zzz", "x")), Request(_inputs("a", "hello", max_tokens=40, stream=True), cancel_after=3)]
        assert model.execute(reqs) is None  # decoupled: responses come from the engine thread
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
        s.close()
        b.close()
    finally:
        model.finalize()


# -- TensorRT plans, and bad input -------------------------------------------------------------------------------------
def _engines_for(bundle_dir, where: Path, plan=b"not a real plan: layout only") -> Path:
    """An engines folder as `mpt-export build` writes it (its sidecar from the library; the plan bytes are not a
    real engine — this machine has no GPU — and nothing here deserializes them)."""
    from mpt_export.runtime.trt.sidecar import SIDECAR, make_sidecar
    from mpt_export.runtime.trt.profiles import fit_limits, profiles

    b = mpt_export.load_bundle(bundle_dir)
    limits = fit_limits(b.manifest)
    profs = profiles(b.manifest, limits)
    files = {g: {"file": f"{g}.plan"} for g in profs}
    where.mkdir(parents=True)
    for g in profs:
        (where / f"{g}.plan").write_bytes(plan)
    sc = make_sidecar(b, "10.16.1", "NVIDIA H100", "9.0", {"precision": "fp32"}, limits.to_dict(), profs, False, files)
    (where / SIDECAR).write_text(json.dumps(sc))
    b.close()
    return where


def test_tensorrt_backend_layout(llama, tmp_path):
    engines = _engines_for(llama.bundle, tmp_path / "engines")
    out = tmp_path / "repo"
    r = cli("triton", llama.bundle, "--out", out, "--backend", "tensorrt", "--engines", engines, "--kind", "gpu",
                "--max-batch", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    cfg = parse(out / "backbone" / "config.pbtxt")
    assert cfg.platform == "tensorrt_plan" and cfg.backend == "tensorrt"
    assert (out / "backbone" / "1" / "model.plan").is_file()
    sidecar = json.loads((out / "backbone" / "1" / "engine.json").read_text())
    assert sidecar["bundle"]["digest"] == json.loads((engines / "engine.json").read_text())["bundle"]["digest"]
    g = cfg.instance_group[0]
    assert g.kind == pb.ModelInstanceGroup.Kind.KIND_GPU and list(g.profile) == [str(i) for i in range(len(
        sidecar["profiles"]["backbone"]))]
    assert parse(out / "composer" / "config.pbtxt").platform == "onnxruntime_onnx"  # the composer stays ONNX
    params = parse(out / "generate" / "config.pbtxt").parameters
    assert params["graph_calls"].string_value == "bls"
    assert json.loads(params["engine_limits"].string_value) == sidecar["limits"]  # checked at admission


def test_bad_input_writes_nothing(llama, make_case, tmp_path):
    out = tmp_path / "repo"

    def refused(*args, expect):
        r = cli("triton", llama.bundle, "--out", out, *args)
        text = r.stdout + r.stderr
        assert r.returncode == 1 and "Traceback" not in text and expect in text, text
        return text

    refused("--backend", "tensorrt", "--kind", "gpu", expect="mpt-export build")
    assert not out.exists()
    refused("--backend", "tensorrt", expect="--kind gpu")
    other = _engines_for(make_case("gpt2").bundle, tmp_path / "other-engines")
    refused("--backend", "tensorrt", "--kind", "gpu", "--engines", other, expect="another bundle")
    refused("--backend", "tensorrt", "--kind", "gpu", "--engines", tmp_path, expect="engine.json")
    assert not out.exists() and not any(p.name.startswith(".repo") for p in tmp_path.iterdir())
    refused("--backend", "nope", expect="onnxruntime or tensorrt")
    # an existing folder: never replaced without --force, never at all when it is not ours
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    refused(expect="not written by mpt-export")
    refused("--force", expect="not written by mpt-export")
    assert (out / "mine.txt").read_text() == "keep"
    (out / "mine.txt").unlink()
    out.rmdir()
    assert cli("triton", llama.bundle, "--out", out).returncode == 0
    first = (out / "backbone" / "config.pbtxt").stat().st_ino
    refused(expect="--force")
    r = cli("triton", llama.bundle, "--out", out, "--force", "--max-batch", "2")
    assert r.returncode == 0 and parse(out / "backbone" / "config.pbtxt").max_batch_size == 2
    assert (out / "backbone" / "config.pbtxt").stat().st_ino != first

"""`mpt-export triton`: the model repository checked offline (Triton's server cannot be installed here) — every
config parsed into Triton's own ModelConfig protobuf and compared with the ONNX graphs, the layout Triton loads,
the rules Triton enforces; TensorRT plans placed from an engines folder; bad input refused with nothing written.
(The generation model's logic: test_triton_generation.py.)"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("tritonclient")
pytest.importorskip("grpc")
from tritonclient.grpc import model_config_pb2 as pb  # noqa: E402

import mpt_export  # noqa: E402
from support import cli  # noqa: E402
from mpt_export.serving.triton.writer import write_repository  # noqa: E402
from mpt_export.serving.triton.check import ONNX_TO_TRITON, check_model, check_repository  # noqa: E402
from triton_config import parse  # noqa: E402


def onnx_io(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return {(side, v.name): (ONNX_TO_TRITON[v.type.tensor_type.elem_type], len(v.type.tensor_type.shape.dim))
            for side, vs in (("input", m.graph.input), ("output", m.graph.output)) for v in vs}


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
    spec = b.info.graphs["backbone"]
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
    (d / "1" / "model.onnx" / spec.external_data).unlink()
    assert any("external data" in p for p in check_model(d, spec))
    b.close()


# -- TensorRT plans, and bad input -------------------------------------------------------------------------------------

def _engines_for(bundle_dir, where: Path, plan=b"not a real plan: layout only", version_compatible=False) -> Path:
    """An engines folder as `mpt-export build` writes it (its sidecar from the library; the plan bytes are not a
    real engine — this machine has no GPU — and nothing here deserializes them)."""
    from mpt_export.runtime.trt.sidecar import SIDECAR, make_sidecar
    from mpt_export.runtime.trt.profiles import fit_limits, profiles

    b = mpt_export.load_bundle(bundle_dir)
    limits = fit_limits(b.info)
    profs = profiles(b.info, limits)
    files = {g: {"file": f"{g}.plan"} for g in profs}
    where.mkdir(parents=True)
    for g in profs:
        (where / f"{g}.plan").write_bytes(plan)
    sc = make_sidecar(b, "10.16.1", "NVIDIA H100", "9.0", {"precision": "fp32"}, limits.to_dict(), profs,
                      version_compatible, files)
    (where / SIDECAR).write_text(json.dumps(sc))
    b.close()
    return where


def test_tensorrt_backend_layout(llama, tmp_path):
    """Plans, profiles per instance, one execution context allocated per profile in use (not each sized for the
    largest), and the start command with what the repository needs: version-compatible plans load only with the
    TensorRT backend's version-compatible=true, and BLS moves each step's KV through Python backend's /dev/shm."""
    from mpt_export.serving.triton.writer import kv_bytes

    engines = _engines_for(llama.bundle, tmp_path / "engines", version_compatible=True)
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
    assert cfg.parameters["execution_context_allocation_strategy"].string_value == "ON_PROFILE_CHANGE"
    said = " ".join((r.stdout + r.stderr).split())
    kv = kv_bytes(mpt_export.load_bundle(llama.bundle).info, 4, sidecar["limits"])
    lim = sidecar["limits"]  # 2 layers x 4 rows x 4 KV heads x (5 prompt + input + new) x 8 x fp32, keys and values
    assert kv == 2 * 2 * 4 * 4 * (5 + lim["max_input"] + lim["max_new_tokens"]) * 8 * 4
    assert (f"start: tritonserver --model-repository={out.resolve()} --backend-config=tensorrt,version-compatible=true "
            f"--backend-config=python,shm-default-byte-size={2 * kv} --backend-config=python,shm-growth-byte-size="
            f"{max(2 * kv // 4, 1 << 20)}") in said, said
    assert "docker run --shm-size=" in said
    plain = cli("triton", llama.bundle, "--out", tmp_path / "plain")  # ONNX Runtime in process: none of it
    assert f"start: tritonserver --model-repository={(tmp_path / 'plain').resolve()}\n" in plain.stdout
    assert "shm" not in plain.stdout and "execution_context" not in (tmp_path / "plain" / "backbone" / "config.pbtxt").read_text()


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

"""fp16 / bf16 bundles and quantization (weight-only int8/int4, dynamic int8)."""

import json
import shutil

import numpy as np
import onnx
import pytest

import mpt_export
from support import cli
from mpt_export.errors import InputError, ValidationError
from mpt_export.export.torchside import adapters_from_bank, load_base_model
from mpt_export.export.reference import peft_causal_forward, peft_model_for, peft_seq2seq_forward, shift_right
from support import assert_clean_failure, no_output_left


@pytest.mark.parametrize("arch,nts", [("llama-gqa", None), ("gpt2", None), ("t5", 2)])
def test_fp16_parity_on_cpu(make_case, tmp_path, arch, nts):
    case = make_case(arch, nts)
    b = mpt_export.export_bundle(case.base, case.adapters, tmp_path / "fp16", dtype="fp16", seed=3)
    assert b.manifest["dtype"] == "float16"
    val = b.manifest["validation"]
    assert val["passed"] and (val["atol"], val["rtol"]) == (1e-3, 3e-2) and val["dtype"] == "float16"
    main = "encoder.onnx" if case.seq2seq else "backbone.onnx"
    g = onnx.load(str(b.file(main)), load_external_data=False)
    types = {i.name: i.type.tensor_type.elem_type for i in g.graph.input}
    assert types["prompt_embeds"] == onnx.TensorProto.FLOAT16  # prompts arrive in the graph's dtype
    assert onnx.load(str(b.file("composer.onnx"))).graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # independent check against PEFT in fp32, and the fp16 bundle is half the size of the weights in fp32
    model, _, _ = load_base_model(case.base)
    s = b.session()
    assert s.dtype == np.float16
    rng = np.random.default_rng(0)
    for ck, names in adapters_from_bank(b.task_bank()):
        pm = peft_model_for(model, ck)
        ids = rng.integers(2, s.vocab_size, (1, 7))
        if case.seq2seq:
            labels = rng.integers(2, s.vocab_size, (1, 3))
            ref = peft_seq2seq_forward(pm, ids, labels, 0)["logits"]
            got = s.logits(ids, [names[0]], decoder_input_ids=shift_right(labels, 0))
        else:
            ref = peft_causal_forward(pm, ids, 0)["logits"]
            got = s.logits(ids, [names[0]])
        # 5e-2, or 1% of the largest logit where they are large (the t5 case's are: support.large_activations)
        assert got.dtype == np.float32 and np.abs(got - ref).max() <= max(5e-2, 1e-2 * np.abs(ref).max())
    def weight_bytes(bundle_dir):
        return sum(onnx.numpy_helper.to_array(t).nbytes for g in ("backbone", "encoder", "decoder")
                   if (bundle_dir / f"{g}.onnx").exists()
                   for t in onnx.load(str(bundle_dir / f"{g}.onnx"), load_external_data=True).graph.initializer)

    assert weight_bytes(b.path) < 0.6 * weight_bytes(case.bundle)
    # a planted 10% error in one mid-depth value projection fails the fp16 bundle's default tolerance
    from mpt_export.export.api import validate_against_peft
    from mpt_export.export.precision import tolerance
    from support import planted

    with pytest.raises(ValidationError):
        validate_against_peft(b, planted(model, arch, 1.10), b.task_bank(), tolerance("float16"), 3, "cpu", None)
    assert s.generate_ids(np.array([[5, 6, 7]]), ["a"], max_new_tokens=4).shape[0] == 1


def test_bf16_needs_a_gpu_provider_to_validate(llama, tmp_path):
    out = tmp_path / "bf16"
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", out,
                                 "--dtype", "bf16"), "no bf16 kernels", "--no-validate")
    assert no_output_left(out)
    # the CPU provider however it is written: the same early refusal (once only "cpu" was recognised here)
    for provider in ("CPU", "CPUExecutionProvider"):
        res = cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", out, "--dtype", "bf16",
                  "--provider", provider)
        assert_clean_failure(res, "no bf16 kernels", "--no-validate")
        assert (res.stderr + res.stdout).count("error:") == 1 and no_output_left(out)
    b = mpt_export.export_bundle(llama.base, [str(llama.source)], out, dtype="bf16", validate=False)
    assert b.manifest["dtype"] == "bfloat16" and b.manifest["validation"] is None
    g = onnx.load(str(b.file("backbone.onnx")), load_external_data=False)
    assert g.graph.input[1].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
    with pytest.raises(InputError, match="bf16 bundle"):
        b.session()
    # Triton's Python backend moves numpy arrays: no bf16, whether or not ml_dtypes (numpy's bf16) is imported
    import ml_dtypes  # noqa: F401 - np.dtype("bfloat16") now exists in this process, and still must not be relied on
    from mpt_export.serving.triton.generate import bls_session

    for backend in ("onnxruntime", "tensorrt"):
        assert_clean_failure(cli("triton", out, "--out", tmp_path / f"repo-{backend}", "--backend", backend,
                                 "--kind", "gpu"), "is a bf16 bundle", "--dtype fp16 for Triton")
        assert not (tmp_path / f"repo-{backend}").exists()
    with pytest.raises(InputError, match="is a bf16 bundle"):
        bls_session(b, lambda *a: {}, {"backbone": "backbone", "composer": "composer"})
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out",
                                 tmp_path / "x", "--dtype", "fp8"), "unknown dtype 'fp8'")


def test_int8_dynamic_agreement_is_computed_and_enforced(llama, tmp_path):
    from mpt_export.export.quantize import quantize_bundle

    q = quantize_bundle(llama.bundle, tmp_path / "q", min_agreement=0.0, scheme="int8-dynamic")
    rep = q.manifest["quantization"]["report"]
    assert 0.0 < rep["greedy_agreement"] <= 1.0 and rep["tokens_compared"] == 4 * 2 * 16
    assert 0.0 < rep["free_running_agreement"] <= 1.0
    assert rep["logits_max_abs"] > 0  # really quantized
    assert q.manifest["quantization"]["variant"] == "matmul"
    import onnx

    g = onnx.load(str(q.file("backbone.onnx")), load_external_data=False).graph
    ops = {n.op_type for n in g.node}
    quantized = {t.name for t in g.initializer if t.name.endswith("_quantized")}
    assert "MatMulInteger" in ops  # the projections are int8 ...
    assert not any(n.op_type == "Gather" and any(i.startswith(tuple(quantized)) or i in quantized for i in n.input)
                   for n in g.node)  # ... the embedding table is not (the measured default)
    assert q.manifest["files"]["backbone.onnx.data"] != mpt_export.load_bundle(llama.bundle).manifest["files"]["backbone.onnx.data"]
    assert (q.path / "backbone.onnx.data").stat().st_size < 0.6 * (llama.bundle / "backbone.onnx.data").stat().st_size
    s = q.session()
    assert s.generate_ids(np.array([[3, 4, 5]]), ["t"], max_new_tokens=4).shape == (1, 4)
    # the refusal path: a threshold above the measured agreement writes nothing
    strict = min(1.0, rep["greedy_agreement"] + 1e-9) if rep["greedy_agreement"] < 1.0 else None
    if strict is None:
        pytest.fail("tiny random model quantized without a single differing token; the refusal path needs a noisier one")
    out = tmp_path / "refused"
    with pytest.raises(ValidationError, match="int8-dynamic greedy-token agreement with fp32 is"):
        quantize_bundle(llama.bundle, out, min_agreement=strict, scheme="int8-dynamic")
    assert no_output_left(out)
    res = cli("quantize", llama.bundle, "--out", out, "--quantize", "int8-dynamic", "--min-agreement", str(strict))
    assert_clean_failure(res, "below the required")
    assert no_output_left(out)
    res = cli("verify", q.path, "--base-model", llama.base)
    assert res.returncode == 0 and "greedy-token agreement with the fp32 bundle" in " ".join(res.stdout.split())
    assert "free-running" in " ".join(res.stdout.split())
    res = cli("quantize", llama.bundle, "--out", tmp_path / "all", "--quantize", "int8-dynamic", "--variant", "all",
              "--min-agreement", "0")
    assert res.returncode == 0 and "free-running" in res.stdout, res.stderr
    assert json.loads((tmp_path / "all" / "manifest.json").read_text())["quantization"]["variant"] == "all"
    assert_clean_failure(cli("quantize", llama.bundle, "--out", tmp_path / "v", "--quantize", "int8-dynamic",
                             "--variant", "half"), "unknown int8 variant 'half'")
    # an int8 bundle is not quantized again; the source is untouched
    with pytest.raises(InputError, match="starts from an fp32 bundle"):
        quantize_bundle(q.path, tmp_path / "qq")
    mpt_export.load_bundle(llama.bundle)


def test_export_quantize_int8_cli(llama, tmp_path):
    case = llama
    out = tmp_path / "q"
    res = cli("export", "--base-model", case.base, "--adapter", f"a,b,c={case.source}", "--out", out,
              "--quantize", "int8", "--min-agreement", "0", "--rtol", "1e-3", "--atol", "0")
    assert res.returncode == 0, res.stderr
    assert "greedy-token agreement" in res.stdout
    man = json.loads((out / "manifest.json").read_text())
    assert man["quantization"]["weights"] == "int8" and man["validation"]["passed"]
    # the fp32 export it started from was validated with the tolerance given
    assert (man["validation"]["atol"], man["validation"]["rtol"]) == (0.0, 1e-3)
    assert not list(tmp_path.glob(".q.fp32-*"))  # the intermediate fp32 bundle is gone
    assert mpt_export.load_bundle(out).session().generate_ids(np.array([[5, 6]]), ["a"], max_new_tokens=3).shape[0] == 1


def test_bench_never_reuses_a_derived_bundle_made_from_another_source(llama, make_case, tmp_path):
    from mpt_export.tools.bench import _quantized_bundle

    out = tmp_path / "bundle-int8"
    _quantized_bundle(llama.bundle, out, "int8", lambda s: None)
    first = mpt_export.load_bundle(out).manifest["manifest_sha256"]
    _quantized_bundle(llama.bundle, out, "int8", lambda s: None)  # same source: reused as it is
    assert mpt_export.load_bundle(out).manifest["manifest_sha256"] == first
    other = make_case("gpt2").bundle  # another model, a bundle of the same name
    _quantized_bundle(other, out, "int8", lambda s: None)
    q = mpt_export.load_bundle(out).manifest["quantization"]
    assert q["source_manifest_sha256"] == mpt_export.load_bundle(other).manifest["manifest_sha256"]


def _weight_bytes(graph_file) -> dict:
    """Bytes of the float MatMul weights a graph would have (K x N x 4) and of what MatMulNBits holds instead."""
    m = onnx.load(str(graph_file))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    fp32 = packed = 0
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in n.attribute}
            assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (8 if "int8" in str(graph_file.parent)
                                                                                    else 4, 32, 4), attrs
            fp32 += attrs["K"] * attrs["N"] * 4
            packed += sum(inits[i].nbytes for i in n.input[1:] if i in inits)
    return {"fp32": fp32, "packed": packed, "left_float": [n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm")
                                                          and n.input[1] in inits]}


@pytest.mark.parametrize("scheme,ratio", [("int8", 0.3), ("int4", 0.17)])
def test_weight_only_quantization_runs_matmulnbits(llama, tmp_path, scheme, ratio):
    import onnxruntime as ort

    from mpt_export.scheduler.batching import Scheduler
    from mpt_export.export.quantize import quantize_bundle
    from mpt_export.runtime.trt.check import TrtCheckError, check_trt
    from mpt_export.runtime.trt.profiles import Limits
    from support import serve_all, solo

    q = quantize_bundle(llama.bundle, tmp_path / scheme, scheme=scheme, min_agreement=0.0)
    man = q.manifest["quantization"]
    assert (man["scheme"], man["block_size"], man["symmetric"], man["accuracy_level"]) == (scheme, 32, True, 4)
    rep = man["report"]
    assert rep["logits_max_abs"] > 0 and 0 < rep["greedy_agreement"] <= 1 and 0 < rep["free_running_agreement"] <= 1
    # every projection and the LM head are blocks of int8/int4 (<= 0.3x / 0.17x their fp32 bytes), none left float
    w = _weight_bytes(q.path / "backbone.onnx")
    assert w["left_float"] == [] and 0 < w["packed"] <= ratio * w["fp32"], w
    assert man["graphs"]["backbone"]["matmulnbits"] == 15  # 2 layers x 7 projections + the LM head
    # the embedding table in the same blocks (GatherBlockQuantized), in every graph, stored once
    assert man["embeddings"] == "quantized"
    assert all(g["gatherblockquantized"] == 1 for g in man["graphs"].values())
    if scheme == "int8":  # --embeddings float: the table kept as it was, the bundle larger by the difference
        f = quantize_bundle(llama.bundle, tmp_path / "float-table", scheme=scheme, min_agreement=0.0,
                            embeddings="float")
        assert f.manifest["quantization"]["embeddings"] == "float"
        assert "gatherblockquantized" not in f.manifest["quantization"]["graphs"]["backbone"]
        g = onnx.load(str(llama.bundle / "backbone.onnx"), load_external_data=False).graph
        inits = {t.name: t for t in g.initializer}
        table = next(inits[n.input[0]] for n in g.node if n.op_type == "Gather" and n.input[0] in inits)
        fp32_bytes = int(np.prod(table.dims)) * 4
        size = lambda b: sum(p.stat().st_size for p in b.path.glob("*.data"))  # noqa: E731
        assert size(f) - size(q) >= fp32_bytes * 0.7  # int8 blocks of 32: 1/4 of the bytes and a scale per block
        ids = np.array([[5, 6, 7, 8]])
        np.testing.assert_allclose(q.session().logits(ids, ["a"]), f.session().logits(ids, ["a"]), atol=0.05)
    # ONNX Runtime's optimized graph really runs MatMulNBits (the quantizer can silently return a float model)
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(q.path / "backbone.onnx"), opts, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False)
    assert sum(n.op_type == "MatMulNBits" for n in optimized.graph.node) == 15
    assert sum(n.op_type == "GatherBlockQuantized" for n in optimized.graph.node) == 1
    # the scheduler's mixed-task batches with joins and compactions give each row what it gives alone
    s = q.session()
    rng = np.random.default_rng(4)
    jobs = [dict(task=q.tasks[i % 4], ids=rng.integers(3, 200, int(rng.integers(2, 12))).tolist(),
                 max_new_tokens=int(rng.integers(1, 10)), temperature=0.0, top_k=0, seed=None) for i in range(12)]
    scheduler = Scheduler(s, max_batch=3, max_queue=64).start()
    try:
        assert [r.tokens for r in serve_all(scheduler, jobs)] == [solo(s, j) for j in jobs]
    finally:
        scheduler.stop()
    # TensorRT cannot read the op: said before any build
    with pytest.raises(TrtCheckError, match="unsupported op MatMulNBits"):
        check_trt(q, Limits(max_batch=2, max_input=32, max_new_tokens=16))
    # tasks add on a quantized bundle keeps its weights and its quantization record, and commutes with quantizing:
    # the task added after gives what it gives when added to the fp32 bundle before quantizing
    weights = q.manifest["files"]["backbone.onnx.data"]
    before = tmp_path / "fp32-plus"
    shutil.copytree(llama.bundle, before)
    assert cli("tasks", "add", before, "--adapter", f"extra={llama.target}").returncode == 0
    q2 = quantize_bundle(before, tmp_path / f"{scheme}-2", scheme=scheme, min_agreement=0.0)
    res = cli("tasks", "add", q.path, "--adapter", f"extra={llama.target}")
    assert res.returncode == 0, res.stderr
    after = mpt_export.load_bundle(q.path)
    assert after.manifest["files"]["backbone.onnx.data"] == weights == q2.manifest["files"]["backbone.onnx.data"]
    assert after.manifest["quantization"] == man and after.tasks[-1] == "extra"
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    assert after.session().generate_ids(ids, ["extra", "a"], max_new_tokens=6, eos_token_id=None).tolist() == \
        q2.session().generate_ids(ids, ["extra", "a"], max_new_tokens=6, eos_token_id=None).tolist()


def test_quantize_options_are_one_clear_line(llama, tmp_path):
    for args, needle in ((["--quantize", "int3"], "unknown --quantize 'int3'"),
                         (["--block-size", "24"], "--block-size must be a power of two >= 16"),
                         (["--accuracy-level", "7"], "--accuracy-level must be one of"),
                         (["--quantize", "int8-dynamic", "--block-size", "64"], "are for the weight-only schemes"),
                         (["--variant", "all"], "--variant chooses what int8-dynamic leaves in float"),
                         (["--embeddings", "int2"], "unknown --embeddings 'int2'"),
                         (["--quantize", "int8-dynamic", "--embeddings", "float"], "are for the weight-only schemes"),
                         (["--min-agreement", "1.5"], "[0, 1]")):
        out = tmp_path / "q"
        assert_clean_failure(cli("quantize", llama.bundle, "--out", out, *args), needle)
        assert no_output_left(out)
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out",
                             tmp_path / "e", "--block-size", "64"), "go with --quantize int8|int4")

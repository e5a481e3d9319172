"""TensorRT: profiles, trtexec command lines, ORT TensorRT-EP options, check-trt, engine identity — all checked here
without a GPU; the engine build/run tests need the tensorrt package and a GPU and skip cleanly elsewhere."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

import mpt_export
from support import cli
from mpt_export.errors import InputError
from mpt_export.runtime.trt.check import TrtCheckError, check_trt
from mpt_export.runtime.trt.commands import ort_trt_provider_options, resolve_precision, trtexec_commands
from mpt_export.runtime.trt.sidecar import EngineMismatchError, check_sidecar, make_sidecar
from mpt_export.runtime.trt.profiles import Limits, profiles
from support import assert_clean_failure

LIM = Limits(max_batch=4, max_input=32, max_new_tokens=16)  # tiny models have 64 positions


def _ordered(s):
    return all(lo <= o <= hi for lo, o, hi in zip(s["min"], s["opt"], s["max"]))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "llama-gqa"])
def test_causal_profiles(make_case, arch):
    b = mpt_export.load_bundle(make_case(arch).bundle)
    p = profiles(b.info, LIM)
    assert list(p) == ["backbone"] and [x["name"] for x in p["backbone"]] == ["prefill", "decode"]
    pre, dec = (x["shapes"] for x in p["backbone"])
    names = [i["name"] for i in b.manifest["graphs"]["backbone"]["inputs"]]
    assert list(pre) == names and list(dec) == names and all(_ordered(s) for s in list(pre.values()) + list(dec.values()))
    kv, hd, H = b.base_model["num_kv_heads"], b.base_model["head_dim"], b.base_model["hidden_size"]
    P = 5  # virtual tokens of the test adapters
    assert pre["input_ids"] == {"min": [1, 0], "opt": [2, 8], "max": [4, 32]}
    assert pre["prompt_embeds"] == {"min": [1, 0, H], "opt": [2, 0, H], "max": [4, P, H]}
    assert pre["past_key_values.0.key"] == {"min": [1, kv, 0, hd], "opt": [2, kv, P, hd], "max": [4, kv, P, hd]}
    assert pre["attention_mask"]["max"] == [4, P + 32] and pre["position_ids"]["max"] == [4, P + 32]
    assert dec["input_ids"] == {"min": [1, 1], "opt": [2, 1], "max": [4, 1]}
    assert dec["prompt_embeds"]["max"] == [4, 0, H]
    assert dec["past_key_values.1.value"]["max"] == [4, kv, P + 32 + 16 - 1, hd]
    assert dec["attention_mask"]["max"] == [4, P + 32 + 16]
    with pytest.raises(InputError, match="exceeds the model's 64 positions"):
        profiles(b.info, Limits(max_input=60))


@pytest.mark.parametrize("nts", [1, 2])
def test_seq2seq_profiles(make_case, nts):
    b = mpt_export.load_bundle(make_case("t5", nts).bundle)
    p = profiles(b.info, LIM)
    assert [x["name"] for x in p["encoder"]] == ["encoder"]
    assert [x["name"] for x in p["decoder"]] == ["first_step", "decode"]
    enc = p["encoder"][0]["shapes"]
    assert enc["prompt_embeds"]["max"] == [4, 5, 32] and enc["attention_mask"]["max"] == [4, 5 + 32]
    first, dec = (x["shapes"] for x in p["decoder"])
    PD = 5 if nts == 2 else 0
    assert first["decoder_prompt_embeds"]["max"] == [4, PD, 32] and first["past_key_values.0.key"]["max"][2] == 0
    assert dec["past_key_values.0.key"]["max"] == [4, 4, PD + 16, 8] and dec["cross.1.value"]["max"] == [4, 4, 37, 8]


def trtexec_profile_groups(cmd: list[str]) -> list[dict]:
    """trtexec's own rule (samples/common/sampleOptions.cpp, getOptimizationProfiles / BuildOptions::parse): each
    ``--profile=<i>`` takes the min/opt/max shape options right behind it; indices are unique and cover 0..n-1; any
    shape option left over once profiles are given ('Multiple --minShapes/--optShapes/--maxShapes without
    --profile are not allowed') is an error."""
    groups, i = {}, 0
    while i < len(cmd):
        a = cmd[i]
        if a.startswith("--profile="):
            idx = int(a.split("=", 1)[1])
            assert idx not in groups, "Optimization profile index cannot be the same."
            g, j = {}, i + 1
            while j < len(cmd) and j <= i + 3:
                key = cmd[j].split("=", 1)[0]
                if key not in ("--minShapes", "--optShapes", "--maxShapes") or key in g:
                    break
                g[key] = cmd[j].split("=", 1)[1]
                j += 1
            groups[idx] = g
            i = j
            continue
        assert not a.startswith(("--minShapes", "--optShapes", "--maxShapes")) or not groups and \
            sum(c.startswith(a.split("=")[0]) for c in cmd) == 1, f"{a}: shape option outside a --profile group"
        i += 1
    assert sorted(groups) == list(range(len(groups))), "Found invalid or missing shape spec at profile index"
    return [groups[k] for k in sorted(groups)]


def test_trtexec_and_ort_options(llama, tmp_path):
    b = mpt_export.load_bundle(llama.bundle)
    p = profiles(b.info, LIM)
    (cmd,) = trtexec_commands(b, p, tmp_path / "eng", resolve_precision("fp16", 10, "float32"), "cache.bin", 2048, True)
    assert cmd[0] == "trtexec" and cmd[1] == f"--onnx={llama.bundle / 'backbone.onnx'}"
    assert cmd[2] == f"--saveEngine={tmp_path / 'eng' / 'backbone.plan'}"
    assert cmd[3] == "--skipInference"  # build only: no timing run on random ids out of the vocabulary's range
    groups = trtexec_profile_groups(cmd)
    assert len(groups) == 2 and all(set(g) == {"--minShapes", "--optShapes", "--maxShapes"} for g in groups)
    assert cmd[4] == "--profile=0" and cmd[8] == "--profile=1"  # prefill, then decode, each group complete
    assert groups[0]["--minShapes"].startswith("input_ids:1x0,prompt_embeds:1x0x32,attention_mask:1x1,")
    assert groups[1]["--optShapes"].startswith("input_ids:2x1,")
    for g, prof in zip(groups, p["backbone"]):
        assert g["--maxShapes"] == ",".join(f"{n}:{'x'.join(map(str, s['max']))}" for n, s in prof["shapes"].items())
    assert cmd[-5:] == ["--fp16", "--noTF32", "--timingCacheFile=cache.bin", "--memPoolSize=workspace:2048M",
                        "--versionCompatible"]
    (tf,) = trtexec_commands(b, p, tmp_path / "eng", resolve_precision("auto", 10, "float32", tf32=True))
    assert "--noTF32" not in tf and not any(a.startswith("--fp16") for a in tf)
    # the rule itself: the old form (repeated groups without --profile) is what trtexec refuses
    old_form = [a for a in cmd if not a.startswith("--profile=")]
    with pytest.raises(AssertionError, match="outside a --profile group"):
        trtexec_profile_groups(old_form)
    o = ort_trt_provider_options(p["backbone"], tmp_path / "cache")
    assert o["trt_profile_min_shapes"].count("input_ids:") == 2 and o["trt_engine_cache_enable"]
    assert o["trt_profile_max_shapes"].split(",")[0] == "input_ids:4x32"
    res = cli("build", llama.bundle, "--print-trtexec", "--max-batch", "4", "--max-input", "32",
                  "--max-new-tokens", "16", "--precision", "fp16")
    assert res.returncode == 0, res.stderr
    assert "trtexec" in res.stdout and "--fp16" in res.stdout and "prefill, decode" in res.stdout
    assert_clean_failure(cli("build", llama.bundle, "--print-trtexec", "--trt-version", "11", "--precision", "fp16",
                                 "--max-input", "32", "--max-new-tokens", "16"), "needs a fp16 bundle")


@pytest.mark.parametrize("arch,nts", [("llama-gqa", None), ("gpt2", None), ("t5", 2), ("llama-h64", None)])
def test_check_trt_passes_on_bundles(make_case, arch, nts):
    """A bundle with a fused graph (llama-h64) is checked on its traced graph; check-trt names the fused one as not
    TensorRT's."""
    b = make_case(arch, nts).bundle
    summary = check_trt(mpt_export.load_bundle(b), LIM)
    assert set(summary) == ({"encoder", "decoder"} if arch == "t5" else {"backbone"})
    res = cli("check-trt", b, "--max-input", "32", "--max-new-tokens", "16")
    assert res.returncode == 0 and "all supported" in res.stdout
    assert ("not for TensorRT: backbone_fast.onnx" in " ".join(res.stdout.split())) == (arch == "llama-h64")


def test_target_tensorrt_versions_and_their_parsers_opsets(llama, tmp_path):
    """The release the engines are for: its parser's opset range (onnx-tensorrt's operators.md per branch, NVIDIA's
    opset guide), releases mpt-export does not build for, and a bundle exported past the parser's opset."""
    from support import edit_manifest
    from mpt_export.runtime.trt.versions import check_target, max_opset, parse_trt_version

    assert [max_opset(parse_trt_version(v)) for v in ("10", "10.3", "10.3.0.26", "10.15", "10.16.1", "11.1")] == \
        [20, 20, 20, 24, 24, 25]
    with pytest.raises(InputError, match=r"TensorRT 8.6 \(JetPack 6.0's\) is older than the 10.0"):
        check_target(parse_trt_version("8.6"))
    with pytest.raises(InputError, match="--trt-version must look like 10 or 10.3"):
        parse_trt_version("ten")
    assert_clean_failure(cli("build", llama.bundle, "--print-trtexec", "--trt-version", "8.6"), "JetPack 6.0")
    b = tmp_path / "opset21"  # as an export with --opset 21 records it
    shutil.copytree(llama.bundle, b)
    edit_manifest(b, lambda m: m.update(opset=21), redigest=True)
    with pytest.raises(TrtCheckError, match=r"opset 21; TensorRT 10.3's ONNX parser reads up to opset 20"):
        check_trt(mpt_export.load_bundle(b), LIM, (10, 3))
    assert check_trt(mpt_export.load_bundle(b), LIM, (10, 15))
    assert_clean_failure(cli("check-trt", b, "--trt-version", "10.3", "--max-input", "32", "--max-new-tokens", "16"),
                         "reads up to opset 20", "--opset 20")
    assert_clean_failure(cli("build", b, "--print-trtexec", "--trt-version", "10.3"), "--opset 20")
    res = cli("build", b, "--print-trtexec", "--trt-version", "10.15", "--max-input", "32", "--max-new-tokens", "16")
    assert res.returncode == 0 and "# TensorRT 10.15," in res.stdout


def test_check_trt_fails_precisely(llama, tmp_path):
    from mpt_export.bundle.manifest import write_manifest
    from mpt_export.export.quantize import quantize_bundle

    q = quantize_bundle(llama.bundle, tmp_path / "q", min_agreement=0.0, scheme="int8-dynamic")
    with pytest.raises(TrtCheckError, match="unsupported op DynamicQuantizeLinear") as e:
        check_trt(q, LIM)
    assert any("MatMulInteger" in p for p in e.value.problems)
    # an ONNX Runtime contrib op in the backbone
    bad = tmp_path / "contrib"
    shutil.copytree(llama.bundle, bad)
    m = onnx.load(str(bad / "backbone.onnx"), load_external_data=False)
    logits = next(n for n in m.graph.node if "logits" in n.output)
    logits.output[0] = "pre_gelu"
    m.graph.node.append(onnx.helper.make_node("FastGelu", ["pre_gelu"], ["logits"], domain="com.microsoft",
                                              name="contrib_gelu"))
    onnx.save(m, str(bad / "backbone.onnx"))
    write_manifest(bad, json.loads((bad / "manifest.json").read_text()))
    assert_clean_failure(cli("check-trt", bad, "--max-input", "32", "--max-new-tokens", "16"),
                         "unsupported op FastGelu (domain com.microsoft: an ONNX Runtime contrib op, node contrib_gelu)")
    # external data cut short (and the manifest rewritten to match, so only check-trt can tell)
    data = (bad / "backbone.onnx.data").read_bytes()
    (bad / "backbone.onnx.data").write_bytes(data[: len(data) // 2])
    write_manifest(bad, json.loads((bad / "manifest.json").read_text()))
    with pytest.raises(TrtCheckError, match="external data file backbone.onnx.data is truncated"):
        check_trt(mpt_export.load_bundle(bad), LIM)


def test_engine_identity(make_case, llama):
    b = mpt_export.load_bundle(llama.bundle)
    prof = profiles(b.info, LIM)
    side = make_sidecar(b, "10.3.0", "NVIDIA Jetson AGX Orin", "8.7", resolve_precision("auto", 10, "float32"),
                        LIM.to_dict(), prof, False, {"backbone": {"file": "backbone.plan"}})
    check_sidecar(side, b, "10.3.0", "8.7")  # same everything: fine
    with pytest.raises(EngineMismatchError, match=r"built with TensorRT 10.3.0, this machine runs TensorRT 10.4.1.*rebuild"):
        check_sidecar(side, b, "10.4.1", "8.7")
    with pytest.raises(EngineMismatchError, match=r"compute capability 8.7 \(NVIDIA Jetson AGX Orin\), this GPU is 9.0"):
        check_sidecar(side, b, "10.3.0", "9.0")
    compat = {**side, "version_compatible": True}
    check_sidecar(compat, b, "10.4.1", "8.7")  # later 10.x loads a version-compatible engine
    check_sidecar(compat, b, "11.0.0", "8.7")  # and TensorRT 11, as documented
    with pytest.raises(EngineMismatchError, match="TensorRT 10.3.0, this machine runs TensorRT 10.2.0"):
        check_sidecar(compat, b, "10.2.0", "8.7")  # never an older runtime
    with pytest.raises(EngineMismatchError, match="TensorRT 10.3.0, this machine runs TensorRT 11.0.0"):
        check_sidecar(side, b, "11.0.0", "8.7")  # not version-compatible: only 10.3.0
    other = mpt_export.load_bundle(make_case("gpt2").bundle)
    with pytest.raises(EngineMismatchError, match="built from a different bundle.*graphs that differ: backbone"):
        check_sidecar(side, other, "10.3.0", "8.7")


def test_build_and_generate_errors_without_tensorrt(llama, tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("tensorrt is installed: the engine tests below cover building")
    except ImportError:
        pass
    assert_clean_failure(cli("build", llama.bundle, "--max-input", "32", "--max-new-tokens", "16", "--out",
                                 tmp_path / "eng"), "tensorrt Python package is not installed", "--print-trtexec")
    assert not (tmp_path / "eng").exists()
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--backend", "tensorrt"),
                         "needs the engines folder")


@pytest.mark.tensorrt
def test_tensorrt_engine_matches_onnxruntime(llama, tmp_path):
    pytest.importorskip("tensorrt")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    import numpy as np

    from mpt_export.export.trt_build import build_engines

    eng = build_engines(llama.bundle, tmp_path / "eng", LIM)
    b = mpt_export.load_bundle(llama.bundle)
    ids = np.array([[5, 6, 7, 8], [0, 0, 9, 10]])
    mask = (ids > 0).astype(np.int64)
    ref = b.session().generate_ids(ids, ["a", "t"], mask, max_new_tokens=8, eos_token_id=None)
    got = b.session(backend="tensorrt", engines=eng).generate_ids(ids, ["a", "t"], mask, max_new_tokens=8,
                                                                   eos_token_id=None)
    np.testing.assert_array_equal(got, ref)


def test_ort_tensorrt_ep_options_fit_the_model(llama, tmp_path):
    from mpt_export.runtime.ortgraphs import trt_ep_options

    b = mpt_export.load_bundle(llama.bundle)
    o = trt_ep_options(b, "backbone", cache_dir=tmp_path / "c")  # defaults (512 + 128) shrink to 64 positions
    assert o["trt_engine_cache_path"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    maxes = dict(x.split(":") for x in o["trt_profile_max_shapes"].split(",")[:4])
    assert maxes["attention_mask"] == "8x50"  # P 5 + max_input 45 (59 positions left: 14 new tokens, 45 input)
    assert_clean_failure(cli("generate", llama.bundle, "--task", "a", "hi", "--provider", "tensorrt"),
                         "provider 'tensorrt'", "available providers are")


@pytest.mark.parametrize("arch,nts", [("llama", None), ("t5", 1), ("t5", 2)])
def test_every_profile_is_ordered_over_a_grid_of_limits(make_case, arch, nts):
    """0 <= min <= opt <= max for every dimension of every profile of every graph — TensorRT's rule — for limits
    from 1 up (max-new-tokens 1 with an encoder-only prompt used to give opt < min), in the profiles, the trtexec
    lines and ONNX Runtime's TensorRT-EP options alike."""
    import copy
    import dataclasses
    import itertools

    from mpt_export.bundle.info import BundleInfo

    b = mpt_export.load_bundle(make_case(arch, nts).bundle)
    man = copy.deepcopy(b.manifest)
    man["base_model"]["max_positions"] = 100_000
    man = BundleInfo.of(man, tasks=[dataclasses.asdict(t) for t in b.info.tasks])  # format 3: the files' index
    checked = 0
    for mb, mi, mn in itertools.product([1, 2, 3, 8], [1, 2, 5, 64, 513], [1, 2, 3, 128]):
        for ob, oi in ((None, None), (1, 1), (mb, mi)):
            profs = profiles(man, Limits(max_batch=mb, max_input=mi, max_new_tokens=mn, opt_batch=ob, opt_input=oi))
            for graph, plist in profs.items():
                for prof in plist:
                    for name, sh in prof["shapes"].items():
                        assert all(0 <= lo <= o <= hi for lo, o, hi in zip(sh["min"], sh["opt"], sh["max"])), \
                            (mb, mi, mn, graph, prof["name"], name, sh)
                        checked += 1
                opts = ort_trt_provider_options(plist, "/tmp/unused")
                triples = zip(*(o.split(",") for o in (opts["trt_profile_min_shapes"], opts["trt_profile_opt_shapes"],
                                                       opts["trt_profile_max_shapes"])))
                for lo, o, hi in triples:
                    dims = [list(map(int, x.split(":")[1].split("x"))) for x in (lo, o, hi)]
                    assert all(a <= c <= e for a, c, e in zip(*dims)), (lo, o, hi)
    assert checked > 1000


def test_check_trt_scans_subgraphs_and_functions_and_lists_every_problem(llama, tmp_path):
    """CastLike is supported (TensorRT 10 parser); a float64 initializer is only a warning (the parser casts it
    down); an unsupported op inside an If branch or a model-local function is found; all problems come in one run."""
    from onnx import TensorProto, helper

    from mpt_export.bundle.manifest import write_manifest

    def edit(dst, bad_ops: bool):
        shutil.copytree(llama.bundle, dst)
        m = onnx.load(str(dst / "backbone.onnx"), load_external_data=False)
        g = m.graph
        g.initializer.append(helper.make_tensor("dbl", TensorProto.DOUBLE, [2], [0.5, 1.5]))
        g.node.extend([helper.make_node("CastLike", ["dbl", "cast_to"], ["dbl_f"], name="castlike_node"),
                       helper.make_node("Constant", [], ["cast_to"], value=helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0]))])
        if bad_ops:
            then = helper.make_graph([helper.make_node("Unique", ["dbl_f"], ["u"], name="unique_in_then")], "then",
                                     [], [helper.make_tensor_value_info("u", TensorProto.FLOAT, [None])])
            other = helper.make_graph([helper.make_node("Identity", ["dbl_f"], ["e"], name="id_in_else")], "else",
                                      [], [helper.make_tensor_value_info("e", TensorProto.FLOAT, [None])])
            g.node.extend([helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("b", TensorProto.BOOL, [], [True])),
                           helper.make_node("If", ["cond"], ["if_out"], name="branch", then_branch=then, else_branch=other),
                           helper.make_node("LocalDet", ["dbl_f"], ["det_out"], domain="local.fn", name="call_fn")])
            m.functions.append(helper.make_function("local.fn", "LocalDet", ["x"], ["y"],
                                                    [helper.make_node("Det", ["x"], ["y"], name="det_in_fn")],
                                                    [helper.make_opsetid("", 18)]))
            m.opset_import.append(helper.make_opsetid("local.fn", 1))
        onnx.save(m, str(dst / "backbone.onnx"))
        write_manifest(dst, json.loads((dst / "manifest.json").read_text()))
        return dst

    ok = edit(tmp_path / "castlike", bad_ops=False)
    summary = check_trt(mpt_export.load_bundle(ok), LIM)
    assert any("float64 initializer" in w and "dbl" in w for w in summary["backbone"]["warnings"])
    res = cli("check-trt", ok, "--max-input", "32", "--max-new-tokens", "16")
    assert res.returncode == 0 and "all supported" in res.stdout and "warning" in res.stdout, res.stdout
    bad = edit(tmp_path / "bad", bad_ops=True)
    with pytest.raises(TrtCheckError) as e:
        check_trt(mpt_export.load_bundle(bad), Limits(max_input=60, max_new_tokens=16))
    probs = " | ".join(e.value.problems)
    assert "unsupported op Unique (node unique_in_then in graph > If branch.then_branch" in probs
    assert "unsupported op Det (node det_in_fn in function local.fn.LocalDet" in probs
    assert "exceeds the model's 64 positions" in probs and len(e.value.problems) == 3
    assert "CastLike" not in probs and "dbl" not in probs
    res = cli("check-trt", bad, "--max-input", "60")
    assert_clean_failure(res, "3 problem(s) for TensorRT", "Unique", "Det", "--max-input 60")


@pytest.mark.parametrize("arch,nts", [("llama", None), ("t5", 2)])
def test_default_limits_fit_the_model(make_case, arch, nts):
    """No limits typed: the defaults fit the model's positions (a quarter of the room after the prompt for new
    tokens, the rest for input); T5's relative positions keep 512 / 128. Only typed limits are refused."""
    from mpt_export.runtime.trt.profiles import fit_limits

    bundle = make_case(arch, nts).bundle
    b = mpt_export.load_bundle(bundle)
    lim = fit_limits(b.info)
    if arch == "t5":
        assert (lim.max_batch, lim.max_input, lim.max_new_tokens) == (8, 512, 128)
    else:
        room = 64 - 5  # tiny models: 64 positions, 5 virtual tokens
        assert (lim.max_batch, lim.max_input, lim.max_new_tokens) == (8, room - room // 4, room // 4)
        assert fit_limits(b.info, max_input=50).max_new_tokens == room - 50  # what the typed input leaves
        assert fit_limits(b.info, max_new_tokens=4).max_input == room - 4
        with pytest.raises(InputError, match="exceeds the model's 64 positions"):
            profiles(b.info, fit_limits(b.info, max_input=512))
    profiles(b.info, lim)  # fits
    res = cli("check-trt", bundle)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"max input {lim.max_input} (default), max new tokens {lim.max_new_tokens} (default)" in \
        " ".join(res.stdout.split())
    res = cli("build", bundle, "--print-trtexec", "--max-batch", "2")
    assert res.returncode == 0 and "max batch 2, max input" in res.stdout


def test_tensorrt_limits_refuse_several_decoder_tokens_in_one_call(make_case):
    """TensorRT's decoder profiles take one decoder token per call (generation): a teacher-forced T5 forward over
    several is refused with one line where a session carries TensorRT limits (as the TensorRT backend, ONNX Runtime's
    TensorRT provider and Triton's plans set them), and runs where it does not."""
    from mpt_export.runtime.limits import BackendLimits
    from mpt_export.runtime.trt.profiles import fit_limits

    s = mpt_export.load_bundle(make_case("t5", 2).bundle).session()
    ids, dec = np.array([[5, 6, 7]]), np.array([[0, 9, 10]])
    full = s.logits(ids, ["a"], decoder_input_ids=dec)  # ONNX Runtime: any number of decoder tokens
    s.limits = BackendLimits.from_dict(fit_limits(s.bundle.info).to_dict(), "the TensorRT engines in engines/t5")
    with pytest.raises(InputError, match=r"3 decoder tokens in one call: the TensorRT engines in engines/t5 take 1 "
                                         r"per call .*--backend onnxruntime"):
        s.logits(ids, ["a"], decoder_input_ids=dec)
    np.testing.assert_allclose(s.logits(ids, ["a"], decoder_input_ids=dec[:, :1]),
                               s.logits(ids, ["a"]), rtol=0, atol=0)
    assert full.shape == (1, s.vocab_size)


def test_the_trtexec_route_ends_with_adopt(llama, tmp_path):
    """Jetson route: print the trtexec commands, run them on the board, then `build --adopt` writes the sidecar that
    generate/triton --backend tensorrt need. Here trtexec cannot run: its plans are stand-in files (nothing
    here deserializes them; where the tensorrt package is, adopt loads each and checks its I/O and profiles)."""
    import re

    from mpt_export.runtime.trt.sidecar import check_sidecar, read_sidecar

    eng = tmp_path / "engines"
    res = cli("build", llama.bundle, "--print-trtexec", "--out", eng, "--trt-version", "10.3", "--max-batch", "4",
              "--max-input", "32", "--max-new-tokens", "16")
    assert res.returncode == 0, res.stderr
    adopt = re.search(r"^mpt-export build (.*) --adopt (.*)$", res.stdout, re.M)
    assert adopt, res.stdout
    args = ["build", adopt.group(1), "--adopt", *adopt.group(2).split()]
    assert "--max-batch 4" in adopt.group(2) and "--trt-version 10.3" in adopt.group(2)
    eng.mkdir()
    assert_clean_failure(cli(*args), "has no backbone.plan", "--print-trtexec")
    saved = re.search(r"--saveEngine=(\S+)", res.stdout).group(1)
    Path(saved).write_bytes(b"a trtexec plan (stand-in)")
    assert_clean_failure(cli(*[a if a != "10.3" else "10" for a in args]), "MAJOR.MINOR")
    (eng / "engine.json").write_text("{}")  # not ours: refused, untouched
    assert_clean_failure(cli(*args), "was not written by mpt-export")
    assert (eng / "engine.json").read_text() == "{}"
    (eng / "engine.json").unlink()
    done = cli(*args)
    assert done.returncode == 0 and "adopted" in done.stdout, done.stdout + done.stderr
    side = read_sidecar(eng)
    assert side["tensorrt_version"] == "10.3" and side["gpu_name"] is None
    assert side["engines"]["backbone"] == {"file": "backbone.plan", "built_by": "trtexec"}
    assert side["limits"]["max_batch"] == 4 and list(side["profiles"]) == ["backbone"]
    b = mpt_export.load_bundle(llama.bundle)
    check_sidecar(side, b, "10.3.0.26", "8.7")  # any 10.3.x on the board; TensorRT checks the GPU when it loads
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3, this machine runs TensorRT 10.16.1"):
        check_sidecar(side, b, "10.16.1", "8.7")
    repo = tmp_path / "repo"  # and Triton's TensorRT backend takes the adopted plans
    r = cli("triton", llama.bundle, "--out", repo, "--backend", "tensorrt", "--engines", eng, "--kind", "gpu",
            "--max-batch", "4")
    assert r.returncode == 0, r.stdout + r.stderr
    assert (repo / "backbone" / "1" / "model.plan").read_bytes() == b"a trtexec plan (stand-in)"

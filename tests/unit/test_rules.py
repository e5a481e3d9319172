"""Rules that need neither torch nor a subprocess: sampling numerics, backend limits, API keys, the per-row decode
logic, TensorRT precision and version rules, and every TensorRT name the code uses against TensorRT's bindings."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from mpt_export.errors import InputError, NumericsError
from mpt_export.runtime.decode import Row, choose
from mpt_export.runtime.limits import BackendLimits
from mpt_export.runtime.sampling import GREEDY_BELOW, SamplingConfig, select
from mpt_export.runtime.trt.commands import resolve_precision
from mpt_export.serving.http.protocol import api_key_of


def test_sampling_is_safe_for_every_accepted_temperature():
    logits = np.random.default_rng(0).normal(size=(3, 50)).astype(np.float32) * 30
    for t in (1e-320, 1e-300, GREEDY_BELOW / 10, GREEDY_BELOW, 1e-3, 0.7, 2.0, 50.0):
        cfg = SamplingConfig(4, t, 0, 1.0, seed=1)
        got = select(logits, cfg, cfg.generators(3))
        assert got.shape == (3,) and ((0 <= got) & (got < 50)).all(), t
        if t < GREEDY_BELOW:
            assert cfg.greedy and (got == logits.argmax(-1)).all()
    cfg = SamplingConfig(4, 1e-4, 0, 1e-9, seed=1)  # top_p keeping one token: the argmax, whatever the scale
    assert (select(logits * 1e6, cfg, cfg.generators(3)) == logits.argmax(-1)).all()


def test_sampling_draws_each_token_as_often_as_its_probability_says():
    """The inverse-CDF draw over block sums (vocabularies shorter than, equal to and past one block, and not a multiple
    of it): frequencies within 4 standard errors of softmax(logits / T), masked tokens (top-k) never drawn, and a row
    draws the same tokens alone as in a batch."""
    rng = np.random.default_rng(3)
    for V in (7, 256, 1000):
        logits = rng.normal(size=(1, V)) * 2
        for temp, top_k in ((1.0, 0), (0.7, 5)):
            cfg = SamplingConfig(1, temp, top_k, 1.0, seed=4)
            gen = cfg.generators(1)[0]
            n = 20000
            counts = np.bincount([select(logits, cfg, [gen])[0] for _ in range(n)], minlength=V)
            x = logits[0] / temp
            if top_k:
                x = np.where(x < np.sort(x)[-top_k], -np.inf, x)
            p = np.exp(x - x.max())
            p /= p.sum()
            assert (counts[p == 0] == 0).all(), (V, temp, top_k)
            se = np.sqrt(p * (1 - p) / n)
            assert (np.abs(counts / n - p) <= 4 * se + 1e-4).all(), (V, temp, top_k)
    logits = rng.normal(size=(4, 1000)).astype(np.float32)
    cfg = SamplingConfig(1, 0.8, 0, 0.9, seed=9)
    batch = [select(logits, cfg, cfg.generators(4)) for _ in range(1)][0]
    alone = [select(logits[b:b + 1], cfg, [cfg.generators(4)[b]])[0] for b in range(4)]
    assert batch.tolist() == alone


def test_choose_ends_only_the_rows_that_cannot_go_on():
    logits = np.random.default_rng(1).normal(size=(4, 20))
    logits[2, 5] = np.nan
    cfgs = [SamplingConfig(3, 0.0), SamplingConfig(3, 0.8, seed=2), SamplingConfig(3, 0.0), SamplingConfig(3, 0.0)]
    rows = [Row(c, c.generators(1)[0], eos=7) for c in cfgs]
    nxt, failed = choose(rows, logits)
    assert list(failed) == [2] and isinstance(failed[2], NumericsError)
    assert nxt[0] == logits[0].argmax() and nxt[3] == logits[3].argmax()
    r = rows[0]
    assert r.take(3) == "" and r.finish is None  # no tokenizer: no text, just ids
    assert r.take(7) is None and r.finish == "eos" and r.tokens == [3, 7]
    r = rows[3]
    for tok in (1, 2, 3):
        r.take(tok)
    assert r.finish == "length" and r.tokens == [1, 2, 3]


def test_backend_limits_name_the_limit_and_only_tighten():
    lim = BackendLimits.from_dict({"max_batch": 8, "max_input": 64, "max_new_tokens": 16, "opt_batch": 4},
                                  "the TensorRT engines in e/")
    lim.check(batch=8, longest=64, new_tokens=16)
    for kw, word in ((dict(batch=9), "max_batch"), (dict(longest=65), "max_input"),
                     (dict(new_tokens=17), "max_new_tokens")):
        with pytest.raises(InputError, match=word) as e:
            lim.check(**kw)
        assert "the TensorRT engines in e/" in str(e.value) and "rebuild" in str(e.value)
    assert lim.tighter(max_batch=4).max_batch == 4 and lim.tighter(max_batch=32).max_batch == 8
    assert BackendLimits.from_dict({}, "x") is None and BackendLimits(source="t").tighter(max_batch=3).max_batch == 3


@pytest.mark.parametrize("key,word", [("", "empty"), ("   ", "only whitespace"), (" k", "whitespace"),
                                      ("k\n", "whitespace"), ("kä", "printable ASCII")])
def test_an_api_key_that_would_not_protect_the_server_is_refused(key, word):
    with pytest.raises(InputError, match=word):
        api_key_of(key)
    with pytest.raises(InputError, match="MPT_EXPORT_API_KEY"):
        api_key_of(None, key)
    assert api_key_of(None, None) is None and api_key_of("k-1") == "k-1"


def test_precision_rules():
    core = resolve_precision
    assert core("auto", 10, "float32") == {"precision": "fp32", "strongly_typed": False, "flags": ["--noTF32"],
                                           "tf32": False}
    assert core("auto", 10, "float32", tf32=True) == {"precision": "fp32", "strongly_typed": False, "flags": [],
                                                      "tf32": True}
    assert resolve_precision("fp16", 10, "float32")["flags"] == ["--fp16", "--noTF32"]
    assert resolve_precision("bf16", 10, "float32")["flags"] == ["--bf16", "--noTF32"]
    assert resolve_precision("auto", 10, "float16")["flags"] == ["--stronglyTyped", "--noTF32"]
    assert core("fp16", 11, "float16") == {"precision": "fp16", "strongly_typed": True, "flags": ["--noTF32"],
                                           "tf32": False}
    with pytest.raises(InputError, match="TensorRT 11 builds strongly typed networks: --precision fp16 needs a fp16 bundle"):
        resolve_precision("fp16", 11, "float32")
    with pytest.raises(InputError, match="unknown --precision 'int4'"):
        resolve_precision("int4", 10, "float32")


def test_version_rules_table():
    """TensorRT's documented rule: exact version always; version-compatible (built with >= 8.6) on later releases of
    the same major and on the documented cross-major pairs 8 -> 9, 8 -> 10, 10 -> 11; never on an older runtime."""
    from mpt_export.runtime.trt.sidecar import engine_loads

    table = [  # built, runtime, version_compatible, loads
        ("10.3.0", "10.3.0", False, True), ("10.3.0", "10.4.1", False, False), ("10.3.0", "10.4.1", True, True),
        ("10.4.1", "10.3.0", True, False), ("10.3.0", "11.0.0", True, True), ("10.3.0", "11.2.1", False, False),
        ("11.0.0", "10.9.0", True, False), ("11.0.0", "11.1.0", True, True), ("11.1.0", "12.0.0", True, False),
        ("8.6.1", "9.2.0", True, True), ("8.6.1", "10.0.1", True, True), ("8.6.1", "11.0.0", True, False),
        ("8.5.3", "8.6.1", True, False), ("8.6.1", "8.6.2", True, True), ("9.2.0", "10.0.0", True, False),
    ]
    assert [engine_loads(b, r, vc) for b, r, vc, _ in table] == [ok for *_, ok in table]


TRT_RECEIVERS = {"runtime": "Runtime", "engine": "ICudaEngine", "ctx": "IExecutionContext", "builder": "Builder",
                 "network": "INetworkDefinition", "parser": "OnnxParser", "config": "IBuilderConfig",
                 "prof": "IOptimizationProfile", "cache": "ITimingCache", "used": "ITimingCache"}
TRT_SCOPES = {"Logger": ("Logger", "Severity")}  # Logger.WARNING: the Severity enum nested in the logger binding


def trt_names_used(source: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(class, member, keyword names passed) for every TensorRT name in ``source``: ``trt.X``, ``trt.X.Y`` and
    members of the variables that hold TensorRT objects in our code (TRT_RECEIVERS)."""
    import ast

    tree = ast.parse(source)
    calls = {id(n.func): tuple(k.arg for k in n.keywords if k.arg) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    used = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute):
            continue
        v = n.value
        if isinstance(v, ast.Name) and v.id == "trt":
            used.append(("trt", n.attr, calls.get(id(n), ())))
        elif isinstance(v, ast.Attribute) and isinstance(v.value, ast.Name) and v.value.id == "trt" \
                and not v.attr.startswith("__"):  # trt.__version__.split is Python's
            used.append((v.attr, n.attr, calls.get(id(n), ())))
        elif isinstance(v, ast.Name) and v.id in TRT_RECEIVERS:
            used.append((TRT_RECEIVERS[v.id], n.attr, calls.get(id(n), ())))
    return used


def trt_name_problems(used, api) -> list[str]:
    classes, module = api["classes"], set(api["module"]) | {"__version__"}
    bad = []
    for owner, member, kwargs in used:
        if owner == "trt":
            if member not in classes and member not in module:
                bad.append(f"trt.{member}")
            continue
        scopes = TRT_SCOPES.get(owner, (owner,))
        found = [classes[s][member] for s in scopes if member in classes.get(s, {})]
        if not found:
            bad.append(f"{owner}.{member}")
        elif any(k not in found[0] for k in kwargs):
            bad.append(f"{owner}.{member}({', '.join(kwargs)}): keyword not in {found[0]}")
    return bad


def test_every_tensorrt_name_the_code_uses_exists_in_the_bindings():
    """The TensorRT-only code cannot run here: every attribute, method, enum member and keyword argument it uses
    on TensorRT objects must appear in TensorRT 10's Python bindings (tensorrt_api.json, extracted from the
    bindings' C++ source by scripts/trt_api_names.py)."""
    from pathlib import Path

    import mpt_export.runtime.tensorrt as rt
    import mpt_export.export.trt_build as tb

    import mpt_export.runtime.trt as trt_pkg

    api = json.loads((Path(trt_pkg.__file__).with_name("tensorrt_api.json")).read_text())
    assert api["release"].startswith("10.")
    used = [u for m in (tb, rt) for u in trt_names_used(Path(m.__file__).read_text())]
    names = {f"{o}.{m}" for o, m, _ in used}
    for expected in ("Runtime.engine_host_code_allowed", "Runtime.deserialize_cuda_engine",
                     "IExecutionContext.execute_async_v3", "IExecutionContext.set_input_shape",
                     "IExecutionContext.set_optimization_profile_async", "IBuilderConfig.set_timing_cache",
                     "IBuilderConfig.clear_flag", "BuilderFlag.TF32", "BuilderFlag.VERSION_COMPATIBLE",
                     "IBuilderConfig.get_timing_cache", "ITimingCache.serialize", "IOptimizationProfile.set_shape",
                     "IBuilderConfig.create_timing_cache", "IExecutionContext.set_tensor_address",
                     "Builder.build_serialized_network", "ICudaEngine.get_tensor_profile_shape",
                     "ICudaEngine.num_optimization_profiles"):
        assert expected in names, expected  # the scan sees the calls that matter
    assert trt_name_problems(used, api) == []
    # the guard itself fails on a wrong name, a wrong member and a wrong keyword
    wrong = trt_names_used("runtime.deserialize_engine(b)\nx = trt.BuilderFlag.TF16\n"
                           "config.set_timing_cache(c, ignore_mismatches=True)\ny = trt.Logger.WARN\n")
    assert len(trt_name_problems(wrong, api)) == 4


def test_export_options_are_checked_once_and_keep_one_dtype_name():
    from mpt_export.export.options import ExportOptions

    o = ExportOptions(dtype="fp16", atol=1e-3)
    assert o.dtype == "float16" and o.with_(force=True).dtype == "float16" and o.tolerance["atol"] == 1e-3
    for kw, word in ((dict(dtype="fp8"), "unknown dtype 'fp8'"), (dict(opset=17), "--opset"),
                     (dict(quantize="int2"), "unknown --quantize"), (dict(quantize="int8", dtype="fp16"), "fp32"),
                     (dict(block_size=64), "go with --quantize"), (dict(quantize="int4", block_size=48), "power of two"),
                     (dict(quantize="int8-dynamic", accuracy_level=4), "weight-only schemes"),
                     (dict(dtype="bf16"), "bf16 graphs cannot be validated"), (dict(min_agreement=2), "[0, 1]")):
        with pytest.raises(InputError, match=re.escape(word)):
            ExportOptions(**kw)
    assert ExportOptions(dtype="bf16", validate=False).dtype == "bfloat16"
    q = ExportOptions(quantize="int4", accuracy_level=0).quantization  # the scheme's defaults filled in once
    assert (q.scheme, q.block_size, q.accuracy_level, q.min_agreement, q.variant) == ("int4", 32, 0, 0.85, None)
    assert ExportOptions(quantize="int8").quantization.accuracy_level == 4
    assert ExportOptions(quantize="int8-dynamic").quantization.variant == "matmul"


def test_session_options_are_checked_once_before_any_runtime_loads():
    from mpt_export.errors import OptionError
    from mpt_export.runtime import SessionOptions
    from mpt_export.serving.http.options import ServeOptions

    o = SessionOptions.of("cuda", intra_op_threads=2)  # a string is the provider, as the first argument once was
    assert (o.provider, o.intra_op_threads, o.prepack) == ("cuda", 2, "auto")
    assert SessionOptions.of(o, prepack=None).prepack == "auto" and SessionOptions.of(o) is o
    # every bad value is an option error (an InputError, as before) naming its option as data
    for kw, param, word in ((dict(optimization="max"), "optimization", "optimization level 'max'"),
                            (dict(prepack="yes"), "prepack", "prepack must be"),
                            (dict(intra_op_threads=-1), "intra_op_threads", "threads must be"),
                            (dict(kv_cache_size=-2), "kv_cache_size", "kv_cache_size"),
                            (dict(kv_cache_mib=-1), "kv_cache_mib", "kv_cache_mib must be"),
                            (dict(kv_cache_mib=float("nan")), "kv_cache_mib", "kv_cache_mib must be"),
                            (dict(backend="tvm"), "backend", "unknown backend 'tvm'"),
                            (dict(backend="tensorrt"), "engines", "needs the engines folder"),
                            (dict(provider=""), "provider", "provider must be"),
                            (dict(io_bind=False), "io_bind", "unknown session option(s) io_bind")):
        with pytest.raises(OptionError, match=re.escape(word)) as e:
            SessionOptions.of(**kw)
        assert isinstance(e.value, InputError) and e.value.param == param, kw
    served = ServeOptions(threads=3, prepack=False).session_options
    assert (served.intra_op_threads, served.prepack) == (3, False)
    assert ServeOptions(kv_cache_mib=8).session_options.kv_cache_mib == 8
    with pytest.raises(OptionError, match="--kv-cache-mib must be"):
        ServeOptions(kv_cache_mib=-1)
    for kw, param in ((dict(threads=10**6), "intra_op_threads"), (dict(port=70000), "port"),
                      (dict(max_queue=0), "max_queue"), (dict(api_key=" k"), "api_key")):
        with pytest.raises(OptionError) as e:
            ServeOptions(**kw)
        assert e.value.param == param, kw


def test_one_answer_to_which_provider_and_bf16_refused_on_the_cpu_however_it_is_written():
    from mpt_export.errors import OptionError
    from mpt_export.export.options import ExportOptions
    from mpt_export.runtime.options import canonical_provider, is_cpu_provider

    for name in ("cpu", "CPU", "CPUExecutionProvider", "cpuexecutionprovider"):
        assert canonical_provider(name) == "CPUExecutionProvider" and is_cpu_provider(name), name
        with pytest.raises(OptionError, match=re.escape("bf16 graphs cannot be validated on ONNX Runtime's CPU")) as e:
            ExportOptions(dtype="bf16", provider=name)
        assert e.value.param == "provider"
    for name, full in (("cuda", "CUDAExecutionProvider"), ("TensorRT", "TensorrtExecutionProvider"),
                       ("CUDAExecutionProvider", "CUDAExecutionProvider"), ("MyEP", "MyEP")):
        assert canonical_provider(name) == full and not is_cpu_provider(name)
    assert ExportOptions(dtype="bf16", provider="CUDAExecutionProvider").dtype == "bfloat16"


def test_supported_models_page_lists_every_declared_family():
    from mpt_export.source.archs import arch_for, listed_archs, supported_model_types
    from mpt_export.source.archs.table import supported_models_markdown

    page = supported_models_markdown()
    for mt in supported_model_types():
        assert f"`{mt}`" in page
    assert len(listed_archs()) >= 14 and "other causal LMs" in page
    generic = arch_for({"model_type": "cohere", "architectures": ["CohereForCausalLM"], "hidden_size": 8,
                        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 10})
    assert generic.listed is False and generic.max_positions == 2048 and generic.identity()["listed_family"] is False
    feats = arch_for({"model_type": "gemma2", "sliding_window": 4096, "final_logit_softcapping": 30.0,
                      "attn_logit_softcapping": 50.0, "hidden_size": 8, "num_hidden_layers": 1,
                      "num_attention_heads": 2, "vocab_size": 10, "max_position_embeddings": 8192}).features()
    assert {"sliding window", "attention soft-cap", "logit soft-cap", "embedding scale"} <= set(feats)


def test_bench_export_help_lists_every_shape():
    from mpt_export.cli import app  # noqa: F401 - the help text is a literal; it must name every shape
    from mpt_export.tools.bench_export import SHAPES

    src = (__import__("pathlib").Path(__file__).parents[2] / "cli" / "bench_export.py").read_text()
    assert all(name in src for name in SHAPES)


def test_the_prompt_kv_cache_is_bounded_in_entries_and_in_bytes():
    from mpt_export.runtime.cache import LRU

    kv = lambda n: [np.zeros(n, np.float32), {"v": np.zeros(n, np.float32)}]  # noqa: E731 - 8n bytes
    c = LRU(None, max_bytes=8 * 100)
    for i in range(5):
        c.put(i, kv(30))  # 240 bytes each: three fit
    assert len(c) == 3 and c.bytes == 720 and c.evictions == 2 and c.get(0) is None and c.get(4) is not None
    c.get(2)  # now the most recent: 3 goes next
    c.put(9, kv(30))
    assert c.get(3) is None and c.get(2) is not None and c.stats()["entries"] == 3
    c.put(9, kv(10))  # replaced: its bytes counted once
    assert c.bytes == 2 * 240 + 80
    c.put("big", kv(101))  # larger than the whole budget: not kept, nothing evicted for it
    assert c.get("big") is None and len(c) == 3
    n = LRU(2)  # a count limit alone, as kv_cache_size gives
    for i in range(4):
        n.put(i, kv(1000))
    assert len(n) == 2 and n.stats()["hits"] == 0 and n.stats()["misses"] == 0
    none = LRU(0)
    none.put("x", kv(1))
    assert len(none) == 0 and none.bytes == 0

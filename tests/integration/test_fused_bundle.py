"""The fused graph inside bundles: written beside the traced one by `export` where the model allows it (validated
against PEFT like it, its weights stored once with the traced graph's), chosen by sessions on the CPU, quantized with
the bundle, refused by name where a bundle has none. (Greedy decoding against PEFT on both graphs is in
test_generate.py; the continuous-batching engine on the fused graph in test_engine.py.)"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import mpt_export
from support import assert_clean_failure, cli, edit_manifest, left_padded
from mpt_export.errors import InputError


@pytest.fixture(scope="module")
def h64(make_case):
    return make_case("llama-h64")


def _external(path):
    """initializer name -> (location, offset, length) of a graph's external tensors."""
    out = {}
    for t in onnx.load(str(path), load_external_data=False).graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if ext:
            out[t.name] = (ext["location"], int(ext["offset"]), int(ext["length"]))
    return out


def test_export_writes_a_validated_fused_graph_whose_weights_are_the_traced_graphs(h64):
    b = mpt_export.load_bundle(h64.bundle)
    m = b.manifest
    fast = m["fast_graphs"]["backbone"]
    assert fast["file"] == "backbone_fast.onnx" and fast["external_data"] == m["graphs"]["backbone"]["external_data"]
    assert "fast_graph_skipped" not in m
    rep = m["validation"]["fast_graph"]  # against PEFT, as the traced graph is
    assert rep["passed"] and {c["case"] for c in rep["cases"]} == {"single", "batch"}
    assert len(rep["cases"]) == len(m["validation"]["cases"])
    nodes = onnx.load(str(b.file(fast["file"])), load_external_data=False).graph.node
    assert sum(n.op_type == "GroupQueryAttention" for n in nodes) == 2
    # stored once: every projection of the fused graph is a tensor of the traced graph (same bytes in the file);
    # what only it has are its rotary tables
    plain, fused = _external(b.file("backbone.onnx")), _external(b.file(fast["file"]))
    spans = set(plain.values())
    own = {n: v for n, v in fused.items() if v not in spans}
    assert sorted(own) == ["cos_cache", "sin_cache"], own
    assert sum(v[2] for v in own.values()) == 2 * 64 * 8 * 4  # positions x head_dim/2 x fp32, twice
    assert len(fused) - len(own) >= 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the embedding
    data = b.file(fast["external_data"]).stat().st_size
    assert data < sum(v[2] for v in {*plain.values(), *own.values()}) + 4096 * (len(spans) + 2)


def test_sessions_choose_the_fused_graph_on_the_cpu_and_both_give_the_same_tokens(h64):
    b = mpt_export.load_bundle(h64.bundle)
    fast, plain = b.session(), b.session(graph="plain")
    assert (fast.graph, plain.graph) == ("fast", "plain")
    assert "backbone_fast" in fast._ort and "backbone" not in fast._ort  # the traced graph is not loaded beside it
    tasks = ["t", "a", "c", "b"]
    ids, mask = left_padded(fast.vocab_size, [7, 2, 5, 1])
    np.testing.assert_allclose(fast.logits(ids, tasks, mask), plain.logits(ids, tasks, mask), rtol=1e-4, atol=1e-5)
    kw = dict(max_new_tokens=12, eos_token_id=None)
    on = fast.generate_ids(ids, tasks, mask, **kw)
    np.testing.assert_array_equal(on, plain.generate_ids(ids, tasks, mask, **kw))
    np.testing.assert_array_equal(on, fast.generate_ids(ids, tasks, mask, prompt_kv_cache=False, **kw))
    for i, n in enumerate([7, 2, 5, 1]):  # batch invariance: each row what it gets alone
        np.testing.assert_array_equal(on[i], fast.generate_ids(ids[i:i + 1, -n:], [tasks[i]], **kw)[0])
    # a task added in the session is served by the fused graph at once
    bank = b.task_bank()
    src = bank.task("a")
    fast.add_task("a2", bank.shared[src.shared], src.cols, src.rows)
    np.testing.assert_array_equal(fast.generate_ids(ids[1:2, -2:], ["a2"], **kw), on[1:2])


def test_quantized_bundles_keep_a_fused_graph_over_the_same_quantized_weights(h64, tmp_path):
    from mpt_export.export.quantize import quantize_bundle

    q = quantize_bundle(h64.bundle, tmp_path / "int4", scheme="int4", min_agreement=0.0)
    m = q.manifest
    assert m["quantization"]["graphs"]["backbone_fast"]["matmulnbits"] == 2 * 7 + 1
    plain, fused = _external(q.file("backbone.onnx")), _external(q.file("backbone_fast.onnx"))
    assert sorted(n for n, v in fused.items() if v not in set(plain.values())) == ["cos_cache", "sin_cache"]
    fast, traced = q.session(), q.session(graph="plain")
    assert fast.graph == "fast"
    tasks = ["t", "a", "c"]
    ids, mask = left_padded(fast.vocab_size, [4, 6, 3])
    np.testing.assert_allclose(fast.logits(ids, tasks, mask), traced.logits(ids, tasks, mask), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(fast.generate_ids(ids, tasks, mask, max_new_tokens=8),
                                  traced.generate_ids(ids, tasks, mask, max_new_tokens=8))
    # the scoring graph (echo) is derived again from the quantized backbone: its head is the quantized one
    sc = _external(q.file(m["scoring_graphs"]["backbone"]["file"]))
    assert set(sc.values()) <= set(plain.values())  # the quantized tensors, not a copy
    score = fast.prompt_logprobs([5, 6, 7, 8], "a", 1)
    want = [traced.logits(np.array([[5, 6, 7, 8][:t]]), ["a"])[0] for t in (1, 2, 3)]
    from mpt_export.runtime.sampling import log_softmax

    diffs = [abs(score[t][0] - log_softmax(w)[[5, 6, 7, 8][t]]) for t, w in zip((1, 2, 3), want)]
    assert max(diffs) < 5e-3, diffs  # int4 at accuracy level 4: activations quantized inside the op (fp32: 1e-4)
    dyn = quantize_bundle(h64.bundle, tmp_path / "dyn", scheme="int8-dynamic", min_agreement=0.0)
    assert "scoring_graphs" not in dyn.manifest
    assert "fast_graphs" not in dyn.manifest and "int8-dynamic" in dyn.manifest["fast_graph_skipped"]
    assert not (dyn.path / "backbone_fast.onnx").exists() and dyn.session().graph == "plain"


def test_a_bundle_without_a_fused_graph_says_why(llama, h64, tmp_path):
    b = mpt_export.load_bundle(llama.bundle)  # head size 8: GroupQueryAttention needs a multiple of 16
    assert "fast_graphs" not in b.manifest and "head size 8" in b.manifest["fast_graph_skipped"]
    assert b.session().graph == "plain"
    with pytest.raises(InputError, match=r"has no fused graph \(fast graph: head size 8 .*\); run it with --graph plain"):
        b.session(graph="fast")
    res = cli("generate", str(llama.bundle), "--task", "a", "--graph", "fast", "hello")
    assert_clean_failure(res, "has no fused graph", "--graph plain")
    with pytest.raises(InputError, match="unknown graph 'fused'; choose one of auto, fast, plain"):
        b.session(graph="fused")
    # a half bundle runs the traced graph (its norms and softmax stay fp32), even where the head size allows one
    half = mpt_export.export_bundle(h64.base, h64.adapters, tmp_path / "fp16", dtype="fp16", validate=False)
    assert "fast_graphs" not in half.manifest and "written for fp32 bundles" in half.manifest["fast_graph_skipped"]
    assert half.session().graph == "plain" and not (half.path / "backbone_fast.onnx").exists()
    # a crafted manifest (its digest recomputed) naming a fused graph the bundle does not hold, or other I/O
    for label, (fn, needle) in {
            "file": (lambda m: m["fast_graphs"]["backbone"].update(file="elsewhere.onnx"), "fast_graphs.backbone.file"),
            "io": (lambda m: m["fast_graphs"]["backbone"]["inputs"][2].update(name="seqlens"), "seqlens")}.items():
        bad = tmp_path / label
        shutil.copytree(h64.bundle, bad)
        edit_manifest(bad, fn, redigest=True)
        assert_clean_failure(cli("generate", str(bad), "--task", "a", "hello"), needle)

"""Every listed family, as a tiny model with its real config's features (``tools/families.py``), against PEFT itself:
the export validates at the default tolerance, greedy tokens equal PEFT's forward recomputed without a cache — solo,
in a mixed-task left-padded batch and through the continuous-batching scheduler —, with windows shorter than the
generation; int8/int4 copies are written and run. Unlisted causal LMs: one accepted through the generic path by
validation, one refused in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest

import mpt_export
from support import assert_clean_failure, cli, left_padded, peft_greedy, serve_all, solo
from mpt_export.export.reference import peft_causal_forward, peft_model_for
from mpt_export.export.torchside import adapters_from_bank, load_base_model
from mpt_export.runtime.trt.check import check_trt
from mpt_export.tools.families import TINY_FAMILIES

FAMILIES = list(TINY_FAMILIES)
# the families ONNX Runtime GenAI's builder fuses get our fused graph too (head size 16 in these cases)
FUSED = {"qwen3", "qwen2-window", "mistral-window", "gemma", "gemma2", "gemma3", "phi3", "phi", "smollm3", "granite",
         "olmo2", "llama3-rope", "yarn-rope", "linear-rope", "dynamic-rope"}
# a generation that crosses Phi-3's original_max_position_embeddings keeps the keys it cached with the short
# factors (as transformers' own cached generate does), where a recompute without a cache uses the long ones
# everywhere; and the switch is decided over a batch (as transformers decides it per call). So its greedy runs and
# the export's validation batch stay below the switch (24 positions: 5 virtual + 6 + 13), one forward crosses it below
NEW_TOKENS = {"phi3": 13}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_equals_peft(make_case, family):
    case = make_case(family)
    b = mpt_export.load_bundle(case.bundle)
    m = b.manifest
    assert m["validation"]["passed"] and m["validation"]["rtol"] == 1e-4  # the default tolerance
    assert m["base_model"]["listed_family"] is True
    model_type = json.loads((case.base / "config.json").read_text())["model_type"]
    assert m["base_model"]["model_type"] == model_type
    graphs = ["plain", "fast"] if family in FUSED else ["plain"]
    assert bool(m.get("fast_graphs")) == (family in FUSED), m.get("fast_graph_skipped")
    if family in FUSED:  # the fused graph validated against PEFT too
        assert m["validation"]["fast_graph"]["passed"]
    for graph in graphs:
        _equals_peft(case, b, family, graph)


def _equals_peft(case, b, family, graph):
    m = b.manifest
    s = b.session(graph=graph)
    assert s.graph == graph
    model, _, arch = load_base_model(case.base)
    cfg = json.loads((case.base / "config.json").read_text())
    steps = NEW_TOKENS.get(family, 16)
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    if window:
        assert "sliding window" in m["base_model"]["features"]
        assert 5 + 6 + steps > window + 4  # the generation runs well past the window
    rng = np.random.default_rng(11)
    refs, prompts = {}, {}
    for ck, names in adapters_from_bank(b.task_bank()):
        pm = peft_model_for(model, ck)
        for i, name in enumerate(names):
            ids = rng.integers(1, s.vocab_size, (1, 6))
            refs[name] = peft_greedy(pm, i, ids, steps)
            prompts[name] = ids
            got = s.generate_ids(ids, [name], max_new_tokens=steps, eos_token_id=None)
            assert got.tolist() == [refs[name]], (family, graph, name)
    # a mixed-task, left-padded batch: every row as PEFT gives it alone
    tasks = ["t", "a", "c", "b"]
    lens = [6, 2, 4, 6]
    ids, mask = left_padded(s.vocab_size, lens, seed=3)
    batch = s.generate_ids(ids, tasks, mask, max_new_tokens=steps, eos_token_id=None)
    for row, (task, n) in enumerate(zip(tasks, lens)):
        pm, idx = next((peft_model_for(model, ck), names.index(task))
                       for ck, names in adapters_from_bank(b.task_bank()) if task in names)
        assert batch[row].tolist() == peft_greedy(pm, idx, ids[row:row + 1, ids.shape[1] - n:], steps), (family, graph, row)
    # the scoring graph (echo): the head chain, the family's logit transforms included, over every position
    ck, names = adapters_from_bank(b.task_bank())[0]
    ids = rng.integers(1, s.vocab_size, (1, 7))
    every = s.position_logits(ids[0].tolist(), names[0])
    assert every.shape == (7, s.vocab_size)
    for k in (3, 6):
        ref = peft_causal_forward(peft_model_for(model, ck), ids[:, :k + 1], 0)["logits"]
        assert np.abs(every[k] - ref[0]).max() <= 1e-4 * max(1.0, np.abs(ref).max()), (family, graph, k)
    # TensorRT's ONNX parser takes the plain graph (the CPU-side check: operators, dtypes, profiles)
    check_trt(b)
    if family == "phi3":  # one forward past original_max_position_embeddings: the long factors, as PEFT
        ck, names = adapters_from_bank(b.task_bank())[0]
        long = rng.integers(1, s.vocab_size, (1, 24))  # 5 virtual + 24 > 24
        ref = peft_causal_forward(peft_model_for(model, ck), long, 0)
        assert np.abs(s.forward(long, [names[0]])["logits"] - ref["logits"]).max() <= 1e-4


WINDOWED = ["gemma2", "mistral-window"]


@pytest.mark.parametrize("family", WINDOWED)
def test_window_rows_join_a_running_batch(make_case, family):
    """Continuous batching over a windowed model: rows of mixed tasks join and leave at different steps (holes
    between prompt and text, slots taken over in place) and each equals its solo run."""
    from mpt_export.scheduler.batching import Scheduler

    b = mpt_export.load_bundle(make_case(family).bundle)
    s = b.session()
    rng = np.random.default_rng(4)
    jobs = [dict(task=b.tasks[i % 4], ids=rng.integers(3, s.vocab_size, int(rng.integers(2, 12))).tolist(),
                 max_new_tokens=int(rng.integers(4, 18)), temperature=0.0, top_k=0, seed=None) for i in range(10)]
    scheduler = Scheduler(s, max_batch=3, max_queue=16).start()
    try:
        reqs = serve_all(scheduler, jobs)
        assert [r.error for r in reqs] == [None] * len(reqs)
        assert [r.tokens for r in reqs] == [solo(s, j) for j in jobs]
        assert scheduler.joins["in_place"] + scheduler.joins["rebuild"] > 0
    finally:
        scheduler.stop()


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_copies_of_every_family(make_case, tmp_path, scheme):
    from mpt_export.export.quantize import quantize_bundle

    for family in FAMILIES:
        src = make_case(family).bundle
        q = quantize_bundle(src, tmp_path / f"{family}-{scheme}", min_agreement=0.0, scheme=scheme)
        assert q.manifest["quantization"]["scheme"] == scheme
        # the fused graph is kept, over the same quantized tensors as the traced one
        assert bool(q.manifest.get("fast_graphs")) == (family in FUSED), family
        ref = mpt_export.load_bundle(src).session(graph="plain")
        ids = np.arange(3, 9, dtype=np.int64)[None]
        want = ref.logits(ids, ["a"])
        outs = {g: q.session(graph=g).logits(ids, ["a"]) for g in (("plain", "fast") if family in FUSED else ("plain",))}
        for g, out in outs.items():
            assert out.shape == want.shape and np.isfinite(out).all()
            assert 0 < np.abs(out - want).max() < 0.5 * np.abs(want).max(), (family, g)  # quantized, still close
        if len(outs) == 2:
            assert np.abs(outs["plain"] - outs["fast"]).max() < 0.05 * np.abs(want).max(), family


def test_unlisted_family_accepted_by_validation(make_case, tmp_path):
    case = make_case("cohere")
    out = tmp_path / "bundle"
    res = cli("export", "--base-model", case.base, "--adapter", f"a,b,c={case.source}", "--adapter",
              f"t={case.target}", "--out", out)
    assert res.returncode == 0, res.stderr + res.stdout
    text = " ".join(res.stdout.split())
    assert "model type cohere is not a listed family" in text and "validation against PEFT passed" in text
    assert "base model: cohere with grouped-query attention" in text
    b = mpt_export.load_bundle(out)
    bm = b.base_model
    assert bm["model_type"] == "cohere" and bm["listed_family"] is False and bm["arch"] == "GenericCausal"
    assert b.manifest["validation"]["passed"]
    s = b.session()
    model, _, _ = load_base_model(case.base)
    ck, names = adapters_from_bank(b.task_bank())[0]
    ids = np.array([[5, 6, 7]])
    got = s.generate_ids(ids, [names[1]], max_new_tokens=8, eos_token_id=None)
    assert got.tolist() == [peft_greedy(peft_model_for(model, ck), 1, ids, 8)]  # logit_scale applied, as PEFT


def test_unlisted_family_that_cannot_be_traced_is_refused(make_case, tmp_path):
    case = make_case("mamba")
    res = cli("export", "--base-model", case.base, "--adapter", f"a,b,c={case.source}", "--out", tmp_path / "out")
    assert_clean_failure(res, "model type 'mamba' (not a listed family, tried generically) cannot be exported",
                         "attention-based causal LM")
    assert not (tmp_path / "out").exists()


def test_not_a_causal_lm_is_refused_naming_the_page(make_case, tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps({"model_type": "bert",
                                                               "architectures": ["BertForMaskedLM"]}))
    src = make_case("linear-rope").source
    res = cli("export", "--base-model", tmp_path / "base", "--adapter", f"a,b,c={src}", "--out", tmp_path / "out")
    assert_clean_failure(res, "base model type 'bert' is not supported", "supported models page")


def test_half_precision_keeps_rotary_tables_fp32(make_case, tmp_path):
    """fp16 over long-rope (Phi-4-mini's): the frequency tables stay fp32 as transformers computes them (a cast
    table loses precision, and long-rope's fp32 long factors met an fp16 buffer in the traced where())."""
    import torch

    from mpt_export.export.precision import to_half

    case = make_case("phi3")
    model, _, _ = load_base_model(case.base)
    to_half(model, "float16")
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert next(model.model.layers[0].parameters()).dtype == torch.float16
    b = mpt_export.export_bundle(case.base, case.adapters, tmp_path / "b16", dtype="fp16", seed=3)
    assert b.manifest["dtype"] == "float16" and b.manifest["validation"]["passed"]

"""Real exports of tiny models, run in ONNX Runtime, compared with PEFT's own forward."""

import numpy as np
import onnx
import pytest

import mpt_export
from support import left_padded, peft_refs
from mpt_export.export.torchside import load_base_model
from mpt_export.export.reference import peft_causal_forward

ARCHS = ["llama", "llama-gqa", "gpt2", "mistral", "qwen2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_parity_every_task(make_case, arch):
    case = make_case(arch)
    b, refs = peft_refs(case)
    assert b.tasks == ["a", "b", "c", "t"]
    val = b.manifest["validation"]
    assert val["passed"] and val["logits_max_abs"] <= 1e-4 and val["kv_max_abs"] <= 1e-4
    s = b.session()
    rng = np.random.default_rng(7)
    for name, (pm, idx) in refs.items():
        ids = rng.integers(0, s.vocab_size, (1, 9))
        ref = peft_causal_forward(pm, ids, idx)
        out = s.forward(ids, [name])
        for k, v in ref.items():
            assert np.abs(out[k] - v).max() <= 1e-4, (arch, name, k)


def test_tasks_change_the_output(llama):
    s = mpt_export.load_bundle(llama.bundle).session()
    ids = np.arange(1, 8, dtype=np.int64)[None]
    outs = {t: s.logits(ids, [t]) for t in s.tasks}
    assert min(np.abs(outs[a] - outs[b]).max() for a in outs for b in outs if a != b) > 1e-2


@pytest.mark.parametrize("arch", ["llama-gqa", "gpt2"])
def test_left_padded_mixed_batch_rows_equal_solo(make_case, arch):
    s = mpt_export.load_bundle(make_case(arch).bundle).session()
    tasks = ["a", "t", "c", "b", "t"]
    lens = [9, 3, 6, 1, 9]
    S = max(lens)
    ids, mask = left_padded(s.vocab_size, lens, seed=3)
    batch = s.logits(ids, tasks, attention_mask=mask)
    assert batch.shape == (5, s.vocab_size) and batch.dtype == np.float32
    for i, n in enumerate(lens):
        solo = s.logits(ids[i:i + 1, S - n:], [tasks[i]])
        assert np.abs(batch[i] - solo[0]).max() <= 1e-5


def test_prefill_then_decode_step_equals_longer_prefill(llama):
    """past_key_values in, present out: the cache the runtime will feed back is exact."""
    s = mpt_export.load_bundle(llama.bundle).session()
    ids = np.array([[5, 17, 3, 9, 44, 2]], np.int64)
    full = s.logits(ids, ["b"])
    feed = s.prepare(ids[:, :-1], ["b"])
    out = s.forward(ids[:, :-1], ["b"])
    P = feed["prompt_embeds"].shape[1]
    total = feed["attention_mask"].shape[1] + 1
    step = {"input_ids": ids[:, -1:], "prompt_embeds": np.zeros((1, 0, 32), np.float32),
            "attention_mask": np.ones((1, total), np.int64), "position_ids": np.array([[total - 1]], np.int64)}
    for i in range(s.num_layers):
        step[f"past_key_values.{i}.key"] = out[f"present.{i}.key"]
        step[f"past_key_values.{i}.value"] = out[f"present.{i}.value"]
    dec = s._run_backbone_impl(step)
    assert P == 5 and dec["present.0.key"].shape[2] == total
    assert np.abs(dec["logits"] - full).max() <= 1e-5


def test_graph_io_matches_contract(llama):
    b = mpt_export.load_bundle(llama.bundle)
    m = onnx.load(str(b.file("backbone.onnx")), load_external_data=False)
    names = [i.name for i in m.graph.input]
    assert names[:4] == ["input_ids", "prompt_embeds", "attention_mask", "position_ids"]
    assert names[4:8] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key",
                          "past_key_values.1.value"]
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in list(m.graph.input) + list(m.graph.output)}
    assert dims["prompt_embeds"] == ["batch", "prompt_len", 32]
    assert dims["attention_mask"] == ["batch", "total_len"]
    assert dims["past_key_values.1.value"] == ["batch", 4, "past_len", 8]
    assert dims["logits"] == ["batch", b.base_model["vocab_size"]]
    assert dims["present.0.key"] == ["batch", 4, "total_len", 8]
    assert b.manifest["opset"] == next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    assert b.manifest["graphs"]["backbone"]["inputs"][1]["shape"] == ["batch", "prompt_len", 32]
    c = onnx.load(str(b.file("composer.onnx")))
    assert [i.name for i in c.graph.input] == ["shared_prompt", "task_cols", "task_rows"]
    assert [o.name for o in c.graph.output] == ["prompt_embeds"]


def test_composer_matches_numpy(llama):
    b = mpt_export.load_bundle(llama.bundle)
    s, bank = b.session(), b.task_bank()
    for t in b.tasks:
        np.testing.assert_allclose(s.task_prompt(t), bank.prompt(t), rtol=1e-6, atol=1e-7)


def _initializer_bytes(path):
    m = onnx.load(str(path), load_external_data=True)
    return sum(onnx.numpy_helper.to_array(t).nbytes for t in m.graph.initializer)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_weights_stored_once(make_case, arch):
    import torch

    case = make_case(arch)
    model, _, _ = load_base_model(case.base)
    unique = {p.data_ptr(): p for p in model.parameters()}  # tied weights once
    param_bytes = sum(p.numel() * 4 for p in unique.values())
    embed_bytes = model.get_input_embeddings().weight.numel() * 4
    stored = _initializer_bytes(mpt_export.load_bundle(case.bundle).file("backbone.onnx"))
    if arch == "gpt2":
        assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    # every parameter once (a few small constants such as rotary tables may be added), never a second embedding
    assert param_bytes * 0.97 <= stored < param_bytes + embed_bytes * 0.5, (stored, param_bytes)
    files = sum(p.stat().st_size for p in case.bundle.glob("backbone.onnx*"))
    assert files < param_bytes + embed_bytes * 0.5 + 2_000_000
    del torch

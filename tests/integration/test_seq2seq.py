"""T5 (the MPT paper's backbone): export, parity with PEFT's teacher-forced forward, generation, bad inputs."""

import json
import shutil

import numpy as np
import onnx
import pytest

import mpt_export
from support import peft_refs, cli
from mpt_export.export.torchside import load_base_model
from mpt_export.export.reference import peft_model_for, peft_seq2seq_forward, shift_right
from support import assert_clean_failure, no_output_left

# flan-t5-2 second: test_validation.py (the other test worker) needs it, after its decoder-only cases
CASES = [("t5", 2), ("flan-t5", 2), ("t5", 1), ("flan-t5", 1)]


@pytest.mark.parametrize("arch,nts", CASES)
def test_parity_every_task(make_case, arch, nts):
    case = make_case(arch, nts)
    b, refs = peft_refs(case)
    assert b.task_type == "SEQ_2_SEQ_LM" and b.manifest["num_transformer_submodules"] == nts
    assert [t.rank for t in b.info.tasks] == [2, 2, 2, 1]  # ranks > 1 and 1, source + target
    val = b.manifest["validation"]
    assert val["passed"] and max(val["logits_max_rel"], val["kv_max_rel"], val["encoder_max_rel"]) <= 1e-4
    s = b.session()
    rng = np.random.default_rng(4)
    for name, (pm, idx) in refs.items():
        ids = rng.integers(2, s.vocab_size, (1, 7))
        labels = rng.integers(2, s.vocab_size, (1, 4))
        ref = peft_seq2seq_forward(pm, ids, labels, idx)
        out = s.forward(ids, [name], decoder_input_ids=shift_right(labels, s.decoder_start_token_id))
        for k, v in ref.items():  # the validation's rule (t5's activations are large: support.large_activations)
            assert np.abs(out[k] - v).max() <= 1e-5 + 1e-4 * np.abs(v).max(), (arch, nts, name, k)
        # the decoder really carries the decoder prompt rows when nts == 2
        assert out["present.0.key"].shape[2] == 4 + (5 if nts == 2 else 0)


def peft_greedy_seq2seq(pm, idx, ids, steps, start):
    out = []
    for _ in range(steps):
        labels = np.array([out + [0]], np.int64)  # the last label is a placeholder: only its input position matters
        logits = peft_seq2seq_forward(pm, ids, labels, idx)["logits"]
        out.append(int(logits.argmax(-1)[0]))
    return out


@pytest.mark.parametrize("arch,nts", [("t5", 2), ("flan-t5", 1)])
def test_greedy_equals_peft_teacher_forced(make_case, arch, nts):
    case = make_case(arch, nts)
    b, refs = peft_refs(case)
    s = b.session()
    rng = np.random.default_rng(8)
    for name, (pm, idx) in refs.items():
        ids = rng.integers(2, s.vocab_size, (1, 6))
        ref = peft_greedy_seq2seq(pm, idx, ids, 8, s.decoder_start_token_id)
        got = s.generate_ids(ids, [name], max_new_tokens=8, eos_token_id=None)
        assert got.tolist() == [ref], (arch, nts, name)


@pytest.mark.parametrize("arch,nts", [("t5", 2), ("flan-t5", 1)])
def test_padded_mixed_batch_rows_equal_solo(make_case, arch, nts):
    s = mpt_export.load_bundle(make_case(arch, nts).bundle).session()
    rng = np.random.default_rng(2)
    tasks, lens = ["a", "t", "c", "b"], [8, 3, 5, 1]
    S = max(lens)
    ids = np.zeros((4, S), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):  # right-padded, as T5 tokenizers pad
        ids[i, :n], mask[i, :n] = rng.integers(2, s.vocab_size, n), 1
    batch = s.generate_ids(ids, tasks, mask, max_new_tokens=8, eos_token_id=None)
    sampled = s.generate_ids(ids, tasks, mask, max_new_tokens=8, eos_token_id=None, temperature=1.0, seed=3)
    for i, n in enumerate(lens):
        np.testing.assert_array_equal(batch[i], s.generate_ids(ids[i:i + 1, :n], [tasks[i]], max_new_tokens=8,
                                                               eos_token_id=None)[0])
    # sampling: row b draws from generator (seed, b), so the first row samples as it does alone
    np.testing.assert_array_equal(sampled[0], s.generate_ids(ids[:1, :8], ["a"], max_new_tokens=8, eos_token_id=None,
                                                             temperature=1.0, seed=3)[0])


def test_weights_stored_once_across_graphs(make_case):
    case = make_case("t5", 2)
    model, _, _ = load_base_model(case.base)
    unique = {p.data_ptr(): p for p in model.parameters()}
    param_bytes = sum(p.numel() * 4 for p in unique.values())
    embed = model.get_input_embeddings().weight.numel() * 4
    stored = 0
    seen = set()
    for g in ("encoder.onnx", "decoder.onnx"):
        m = onnx.load(str(case.bundle / g), load_external_data=False)
        for t in m.graph.initializer:
            ext = {e.key: e.value for e in t.external_data}
            if ext:
                assert ext["location"] == "weights.onnx.data"
                key = (ext["offset"], ext["length"])
                if key not in seen:
                    seen.add(key)
                    stored += int(ext["length"])
            else:
                stored += len(t.raw_data)
    assert stored < param_bytes + embed * 0.5, (stored, param_bytes)  # the shared embedding is not stored twice
    assert (case.bundle / "weights.onnx.data").stat().st_size < param_bytes + embed * 0.5 + 4096 * 64
    assert not (case.bundle / "encoder.onnx.data").exists() and not (case.bundle / "decoder.onnx.data").exists()


def test_generate_tasks_add_remove_cli(make_case, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    from mpt_export.tools.demo import make_source_adapter

    case = make_case("t5", 2)
    bdir = tmp_path / "b"
    shutil.copytree(case.bundle, bdir)
    res = cli("generate", bdir, "--task", "t", "the movie was", "--max-new-tokens", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["task"] == "t"
    weights = json.loads((bdir / "manifest.json").read_text())["files"]["weights.onnx.data"]
    new = make_source_adapter(AutoModelForSeq2SeqLM.from_pretrained(str(case.base)), tmp_path / "new", num_tasks=1,
                              num_virtual_tokens=3, num_ranks=1, seed=7, task_type="SEQ_2_SEQ_LM")
    assert cli("tasks", "add", bdir, "--adapter", f"new={new}").returncode == 0
    b = mpt_export.load_bundle(bdir)
    assert b.tasks[-1] == "new" and b.manifest["files"]["weights.onnx.data"] == weights
    model, _, _ = load_base_model(case.base)
    from mpt_export.source.adapters import read_adapter

    pm = peft_model_for(model, read_adapter(new))
    ids = np.array([[5, 6, 7, 8]])
    s = b.session()
    assert s.generate_ids(ids, ["new"], max_new_tokens=5, eos_token_id=None).tolist() == [
        peft_greedy_seq2seq(pm, 0, ids, 5, s.decoder_start_token_id)]
    assert cli("tasks", "remove", bdir, "new").returncode == 0
    assert mpt_export.load_bundle(bdir).tasks == ["a", "b", "c", "t"]


def test_bad_inputs(make_case, llama, tmp_path):
    t5 = make_case("t5", 2)
    out = tmp_path / "o1"
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(t5.source), "--out", out),
                         "SEQ_2_SEQ_LM adapter", "CAUSAL_LM model")
    assert no_output_left(out)
    out = tmp_path / "o2"
    assert_clean_failure(cli("export", "--base-model", t5.base, "--adapter", str(llama.source), "--out", out),
                         "CAUSAL_LM adapter", "SEQ_2_SEQ_LM model")
    assert no_output_left(out)
    # num_transformer_submodules inconsistent with the tensors (saved with 2, config says 1)
    bad = tmp_path / "nts"
    shutil.copytree(t5.source, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["num_transformer_submodules"] = 1
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    out = tmp_path / "o3"
    assert_clean_failure(cli("export", "--base-model", t5.base, "--adapter", str(bad), "--out", out),
                         "prompt_embeddings has shape [10, 32]", "num_transformer_submodules=1", "implies [5, 32]")
    assert no_output_left(out)
    # a T5 adapter into a causal bundle, and the reverse
    assert_clean_failure(cli("tasks", "add", llama.bundle, "--adapter", f"x={t5.target}"),
                         "SEQ_2_SEQ_LM adapter", "CAUSAL_LM model")
    assert_clean_failure(cli("tasks", "add", t5.bundle, "--adapter", f"x={make_case('t5', 1).target}"),
                         "num_transformer_submodules 1")


@pytest.mark.parametrize("nts", [1, 2])
def test_separate_token_tables_export_what_peft_computes(make_case, nts):
    """A T5 checkpoint whose encoder and decoder token tables differ from ``shared`` (transformers keeps them apart
    when the saved values differ; the flan-t5 case's base: support.separate_token_tables): the graphs embed ids with
    the tables PEFT uses, so validation passes and generation equals PEFT's teacher-forced greedy tokens."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    case = make_case("flan-t5", nts)
    loaded = AutoModelForSeq2SeqLM.from_pretrained(str(case.base))
    assert loaded.encoder.embed_tokens.weight is not loaded.shared.weight  # really three tables
    assert not torch.equal(loaded.decoder.embed_tokens.weight, loaded.shared.weight)
    b = mpt_export.load_bundle(case.bundle)
    assert b.manifest["validation"]["passed"]
    ids = np.array([[5, 9, 14, 3, 7]])
    s = b.session()
    got = s.generate_ids(ids, ["b"], max_new_tokens=4, eos_token_id=None)[0]
    # teacher-forced: PEFT's greedy choice at every position of the bundle's own output
    from mpt_export.export.torchside import adapters_from_bank

    ck, names = adapters_from_bank(b.task_bank())[0]
    pm = peft_model_for(loaded, ck)
    for k in range(1, len(got) + 1):
        ref = peft_seq2seq_forward(pm, ids, np.array([got[:k]]), names.index("b"))
        assert int(ref["logits"][0].argmax()) == int(got[k - 1]), (k, got)

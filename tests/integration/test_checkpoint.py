import json
import shutil

import numpy as np
import pytest

from mpt_export.source.adapters import build_task_bank, parse_adapter_spec, read_adapter
from mpt_export.bundle.bankfile import load_files, merged_index, write_file
from mpt_export.bundle.taskbank import TaskBank
from mpt_export.errors import BaseModelError, CheckpointError, TaskNameError
from support import TINY, assert_clean_failure, cli, no_output_left, wide_adapter


def test_reads_source_and_target(llama):
    src = read_adapter(llama.source)
    assert (src.num_tasks, src.num_ranks, src.kind) == (3, 2, "source")
    assert src.prompt_embeddings.shape == (5, 32) and src.cols.shape == (3, 5, 2) and src.rows.shape == (3, 2, 32)
    tgt = read_adapter(llama.target)
    assert (tgt.num_tasks, tgt.num_ranks, tgt.kind, tgt.init) == (1, 1, "target", "ONLY_SOURCE_SHARED")
    # the target trained its own shared prompt
    assert not np.array_equal(src.prompt_embeddings, tgt.prompt_embeddings)


def test_target_reads_without_its_init_file(llama, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(llama.target, d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["prompt_tuning_init_state_dict_path"] = str(tmp_path / "no" / "such.safetensors")
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    assert read_adapter(d).num_tasks == 1


def test_legacy_bin_equals_safetensors(llama, tmp_path):
    import torch
    from safetensors.torch import load_file

    d = tmp_path / "legacy"
    d.mkdir()
    shutil.copy(llama.source / "adapter_config.json", d)
    torch.save(load_file(str(llama.source / "adapter_model.safetensors")), d / "adapter_model.bin")
    a, b = read_adapter(d), read_adapter(llama.source)
    assert a.weights_file == "adapter_model.bin"
    np.testing.assert_array_equal(a.cols, b.cols)
    np.testing.assert_array_equal(a.prompt_embeddings, b.prompt_embeddings)


def test_bin_with_code_is_refused(llama, tmp_path):
    """weights_only=True: a pickle that would run code is rejected, never executed."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(llama.source / "adapter_config.json", d)
    (d / "adapter_model.bin").write_bytes(pickle.dumps({"prompt_embeddings": Evil()}))
    with pytest.raises(CheckpointError, match="weights-only"):
        read_adapter(d)


def test_task_bank_names_dedup_and_roundtrip(llama, tmp_path):
    bank, _ = build_task_bank([str(llama.source), f"x={llama.target}", f"y={llama.target}"])
    src = llama.source.resolve().name
    assert bank.names == [f"{src}-0", f"{src}-1", f"{src}-2", "x", "y"]
    assert len(bank.shared) == 2  # x and y share the target's P*: stored once
    write_file(tmp_path / "tasks.safetensors", bank)
    back = load_files([tmp_path / "tasks.safetensors"])
    assert back.names == bank.names
    for n in bank.names:
        np.testing.assert_array_equal(back.prompt(n), bank.prompt(n))
    back.remove("x")
    assert back.names[-1] == "y" and len(back.shared) == 2
    back.remove(f"{src}-1"), back.remove(f"{src}-0"), back.remove(f"{src}-2")
    assert len(back.shared) == 1 and back.tasks[0].shared == 0
    # a segment removes, then adds (a name may come back): what the index says is what loading gives
    seg = TaskBank(bank.task_type, bank.num_transformer_submodules)
    seg.add_adapter(read_adapter(llama.target), ["x"], taken={"y"})
    write_file(tmp_path / "seg.safetensors", seg, removed=[f"{src}-1", "x"])
    files = [tmp_path / "tasks.safetensors", tmp_path / "seg.safetensors"]
    both = load_files(files)
    assert both.names == [f"{src}-0", f"{src}-2", "y", "x"]
    index = merged_index(files)
    assert [(e.name, e.shared_prompt, e.rank, e.prompt_len) for e in index] == [
        (t.name, t.shared, t.rank, both.shared[t.shared].shape[0]) for t in both.tasks]
    assert len(both.shared) == 2  # the segment's prompt is the target's, already in the bank: one copy
    np.testing.assert_array_equal(both.prompt("x"), bank.prompt("x"))


def test_prompt_is_hadamard_of_low_rank(llama):
    bank, (ck, _) = build_task_bank([f"a,b,c={llama.source}", f"t={llama.target}"])
    np.testing.assert_allclose(bank.prompt("b"), ck.prompt_embeddings * (ck.cols[1] @ ck.rows[1]), rtol=1e-6)


@pytest.mark.parametrize("spec,exc,msg", [
    ("a,b={src}", TaskNameError, "2 name"),
    ("a,a,b={src}", TaskNameError, "'a' is given twice"),
    ("a,b c,d={src}", TaskNameError, "invalid"),
])
def test_bad_names(llama, spec, exc, msg):
    with pytest.raises(exc, match=msg):
        build_task_bank([spec.format(src=llama.source)])


def test_hidden_size_mismatch(llama):
    with pytest.raises(BaseModelError, match="token_dim 32.*hidden size is 48"):
        build_task_bank([str(llama.source)], hidden_size=48)


def test_parse_spec():
    assert parse_adapter_spec("a,b=some/dir")[0] == ["a", "b"]
    assert parse_adapter_spec("some/dir")[0] is None


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _lora_adapter(base, out):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(base))
    get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")).save_pretrained(str(out))
    return out


def _empty_dir(path):
    path.mkdir()
    return path


def _bad_cases(llama, tmp_path):
    corrupt = _copy(llama.source, tmp_path / "corrupt")
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00\x01garbage" * 10)
    trunc = _copy(llama.source, tmp_path / "trunc")
    data = (trunc / "adapter_model.safetensors").read_bytes()
    (trunc / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    mismatched = _copy(llama.source, tmp_path / "mismatch")
    cfg = json.loads((mismatched / "adapter_config.json").read_text())
    cfg["num_virtual_tokens"] = 7
    (mismatched / "adapter_config.json").write_text(json.dumps(cfg))
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"],
                                                  "hidden_size": 32}))
    enc_only = tmp_path / "t5enc"
    enc_only.mkdir()
    (enc_only / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"],
                                                      "d_model": 32, "num_layers": 1, "num_heads": 4, "d_kv": 8}))
    return [
        ("corrupt safetensors", [str(corrupt)], llama.base, ["corrupt or truncated", "adapter_model.safetensors"]),
        ("truncated safetensors", [str(trunc)], llama.base, ["corrupt or truncated"]),
        ("lora adapter", [str(_lora_adapter(llama.base, tmp_path / "lora"))], llama.base, ["LORA", "MULTITASK_PROMPT_TUNING"]),
        ("token_dim != hidden", [str(wide_adapter(tmp_path))], llama.base, ["token_dim 48", "hidden size is 32"]),
        ("tensors vs config", [str(mismatched)], llama.base, ["prompt_embeddings has shape [5, 32]", "implies [7, 32]"]),
        ("duplicate name", [f"a,b,c={llama.source}", f"c={llama.target}"], llama.base, ["'c' is already taken"]),
        ("invalid name", [f"a,b,c d={llama.source}"], llama.base, ["'c d' is invalid"]),
        ("wrong count of names", [f"a,b={llama.source}"], llama.base, ["2 name(s)", "holds 3 task(s)"]),
        ("unsupported base model", [str(llama.source)], bert, ["model type 'bert' is not supported", "llama"]),
        ("base without LM head", [str(llama.source)], enc_only, ["T5EncoderModel", "not a seq2seq LM"]),
        ("no base model", [str(llama.source)], tmp_path / "nothing", ["base model directory", "does not exist"]),
        ("base model without config", [str(llama.source)], _empty_dir(tmp_path / "empty"), ["no config.json"]),
        ("no adapter dir", [str(tmp_path / "missing")], llama.base, ["does not exist"]),
    ]


def test_bad_inputs_fail_cleanly(llama, tmp_path):
    """Every wrong input of an export: exit code 1, one line naming what was expected, nothing written."""
    for label, adapters, base, needles in _bad_cases(llama, tmp_path):
        out = tmp_path / f"out-{label.replace(' ', '_')}"
        args = ["export", "--base-model", base, "--out", out]
        for a in adapters:
            args += ["--adapter", a]
        res = cli(*args)
        assert_clean_failure(res, *needles)
        assert no_output_left(out), label


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_sentencepiece_only_base_model_gets_a_tokenizer_json(tmp_path, kind):
    """A base model saved with a slow (SentencePiece) tokenizer only (T5's spiece.model, Llama's tokenizer.model):
    the bundle's tokenizer.json is converted from it and gives the tokens transformers gives; a Llama one is exported
    and generates through the CLI (a T5 export costs 30 s more and reads its tokenizer the same way)."""
    import mpt_export
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mpt_export.export.tokenizer import write_tokenizer
    from mpt_export.tools.demo import make_base_model, make_sentencepiece_tokenizer, make_source_adapter

    base = tmp_path / "base"
    vocab = make_sentencepiece_tokenizer(base, kind=kind)
    make_base_model(base, arch=kind, tokenizer=False, vocab_size=vocab, **TINY)
    assert not (base / "tokenizer.json").exists()
    info = write_tokenizer(base, tmp_path / "tok")
    assert "converted from" in info["tokenizer.json"]
    text = "the movie was great"
    ref = AutoTokenizer.from_pretrained(str(base))(text)["input_ids"]
    assert Tokenizer.from_file(str(tmp_path / "tok" / "tokenizer.json")).encode(text).ids == ref
    if kind == "t5":
        return
    make_source_adapter(AutoModelForCausalLM.from_pretrained(str(base)), tmp_path / "src", num_tasks=2,
                        num_virtual_tokens=4, task_type="CAUSAL_LM")
    with mpt_export.export_bundle(base, [f"a,b={tmp_path / 'src'}"], tmp_path / "b", validate=False,
                                  fast_graph=False) as b:
        assert "converted from" in b.manifest["tokenizer"]["tokenizer.json"]
        assert b.session().tokenizer.tok.encode(text).ids == ref
    res = cli("generate", tmp_path / "b", "--task", "b", text, "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert len(json.loads(res.stdout)["ids"]) >= 1


def test_a_format_2_bundle_reads_and_converts_at_its_first_edit(llama, tmp_path):
    """A bundle as earlier versions wrote it (format 2: the task list in the manifest, one tensor pair per task in
    tasks.safetensors) opens, verifies and generates as before; its first `tasks add` writes it as format 3, the old
    tasks unchanged."""
    import mpt_export
    from safetensors.numpy import save_file

    from mpt_export.bundle.manifest import write_manifest
    from support import cli

    b = tmp_path / "old"
    shutil.copytree(llama.bundle, b)
    bank = load_files([b / "tasks.safetensors"])
    tensors = {f"shared.{i}": s for i, s in enumerate(bank.shared)}
    for t in bank.tasks:
        tensors[f"task.{t.name}.cols"], tensors[f"task.{t.name}.rows"] = t.cols, t.rows
    (b / "tasks.safetensors").unlink()
    save_file(tensors, str(b / "tasks.safetensors"), metadata={
        "format": "mpt-export/tasks/1", "task_type": bank.task_type,
        "num_transformer_submodules": str(bank.num_transformer_submodules),
        "tasks": json.dumps([{"name": t.name, "shared": t.shared, "source": t.source, "index": t.index_in_source}
                             for t in bank.tasks])})
    m = json.loads((b / "manifest.json").read_text())
    m.pop("task_files")
    m["format"] = "mpt-export/bundle/2"
    m["tasks"] = [{"name": t.name, "shared_prompt": t.shared, "prompt_len": int(bank.shared[t.shared].shape[0]),
                   "rank": t.rank, "source": t.source, "index_in_source": t.index_in_source,
                   "digest": t.digest(bank.shared[t.shared]), "bytes": int((t.cols.size + t.rows.size) * 4)}
                  for t in bank.tasks]
    write_manifest(b, m)
    ids = np.array([[4, 5, 6]])
    want = mpt_export.load_bundle(llama.bundle).session().generate_ids(ids, ["a"], max_new_tokens=5)
    old = mpt_export.load_bundle(b)
    assert old.info.format == "mpt-export/bundle/2" and old.tasks == bank.names
    assert old.session().generate_ids(ids, ["a"], max_new_tokens=5).tolist() == want.tolist()
    assert cli("verify", b).returncode == 0
    assert cli("tasks", "add", b, "--adapter", f"new={llama.target}").returncode == 0
    new = mpt_export.load_bundle(b)
    assert new.info.format == "mpt-export/bundle/3" and "tasks" not in new.manifest
    assert new.tasks == bank.names + ["new"] and new.info.task_files[0] == "tasks.safetensors"
    assert new.session().generate_ids(ids, ["a"], max_new_tokens=5).tolist() == want.tolist()

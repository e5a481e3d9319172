"""The README stands alone and its Python example runs; slow (SentencePiece) tokenizers become tokenizer.json."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

import mpt_export
from support import TINY, run_cli

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs(llama, tmp_path, monkeypatch, capsys):
    """The README's Python block, run as written from a directory laid out like the repository after make demo."""
    code = re.search(r"## Python\n.*?```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    demo = tmp_path / "build" / "demo"
    (demo / "adapters").mkdir(parents=True)
    os.symlink(llama.base, demo / "base")
    os.symlink(llama.source, demo / "adapters" / "source")
    os.symlink(llama.target, demo / "adapters" / "target")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "['sst2', 'mnli', 'qnli', 'rte']" in out
    assert mpt_export.load_bundle(tmp_path / "build" / "my-bundle").tasks == ["sst2", "mnli", "qnli", "rte"]


def test_readme_and_help_stand_alone():
    text = (ROOT / "README.md").read_text()
    assert "DESIGN.md" not in text and "shared/" not in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        if not link.startswith("http"):
            assert (ROOT / link).is_file(), link
    res = run_cli("export", "--help")
    assert "T5" in res.stdout and "causal-LM directory" not in res.stdout


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_sentencepiece_only_base_model_gets_a_tokenizer_json(tmp_path, kind):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from mpt_export.tools.demo import make_base_model, make_sentencepiece_tokenizer, make_source_adapter

    base = tmp_path / "base"
    vocab = make_sentencepiece_tokenizer(base, kind=kind)
    make_base_model(base, arch=kind, tokenizer=False, vocab_size=vocab, **TINY)
    assert not (base / "tokenizer.json").exists()
    seq2seq = kind == "t5"
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    make_source_adapter(auto.from_pretrained(str(base)), tmp_path / "src", num_tasks=2, num_virtual_tokens=4,
                        task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM")
    res = run_cli("export", "--base-model", base, "--adapter", f"a,b={tmp_path / 'src'}", "--out", tmp_path / "b")
    assert res.returncode == 0, res.stderr
    with mpt_export.load_bundle(tmp_path / "b") as b:
        assert b.has_file("tokenizer/tokenizer.json")
        assert "converted from" in b.manifest["tokenizer"]["tokenizer.json"]
        s = b.session()
        text = "the movie was great"
        ref = AutoTokenizer.from_pretrained(str(base))(text)["input_ids"]
        assert s.tokenizer.tok.encode(text).ids == ref  # the same tokens transformers gives
        out = s.generate([text], ["a"], max_new_tokens=4)
        assert isinstance(out[0], str)
    res = run_cli("generate", tmp_path / "b", "--task", "b", text, "--max-new-tokens", "3", "--json")
    assert res.returncode == 0, res.stderr
    assert np.asarray(__import__("json").loads(res.stdout)["ids"]).size >= 1

"""Validation judges each output against its own magnitude: healthy models with large activations pass by default,
a planted 1% error in one attention projection fails on every architecture."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import mpt_export
from support import TINY, planted, cli
from mpt_export.errors import ValidationError
from mpt_export.export.api import _validate
from mpt_export.export.torchside import load_base_model
from mpt_export.export.precision import DEFAULT_TOL, tolerance
from support import assert_clean_failure

ARCHS = ["llama", "llama-gqa", "mistral", "qwen2", "gpt2", "t5", "flan-t5"]


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_one_percent_error_fails_on_every_architecture(make_case, arch):
    case = make_case(arch)
    with mpt_export.load_bundle(case.bundle) as b:
        model, _, _ = load_base_model(case.base)
        bank = b.task_bank()
        healthy = _validate(b, model, bank, tolerance("float32"), 7, "cpu", None)  # same inputs: passes
        assert healthy["passed"] and healthy["rule"].startswith("max|a-b| <= atol + rtol")
        with pytest.raises(ValidationError, match="differ from PEFT beyond atol") as e:
            _validate(b, planted(model, arch, 1.01), bank, tolerance("float32"), 7, "cpu", None)
        rep = e.value.report
        worst = max(max(c["logits_max_rel"], c["kv_max_rel"]) for c in rep["cases"])
        assert worst > 10 * DEFAULT_TOL["float32"]["rtol"], worst  # caught with a wide margin, not by luck


def test_healthy_t5_with_large_activations_passes_by_default(tmp_path):
    """Real T5 checkpoints have activations of tens to thousands; fp32 rounding grows with them."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    from mpt_export.tools.demo import make_base_model, make_source_adapter
    from mpt_export.export.reference import peft_seq2seq_forward

    model = make_base_model(tmp_path / "base", arch="t5", seed=3, **TINY)
    with torch.no_grad():
        model.shared.weight.mul_(10.0)
        for stack in (model.encoder, model.decoder):
            stack.final_layer_norm.weight.mul_(10.0)
            for blk in stack.block:
                blk.layer[-1].DenseReluDense.wo.weight.mul_(3.0)
    model.save_pretrained(str(tmp_path / "base"))
    make_source_adapter(AutoModelForSeq2SeqLM.from_pretrained(str(tmp_path / "base")), tmp_path / "src", num_tasks=2,
                        num_virtual_tokens=5, num_ranks=2, task_type="SEQ_2_SEQ_LM")
    b = mpt_export.export_bundle(tmp_path / "base", [f"a,b={tmp_path / 'src'}"], tmp_path / "bundle", seed=1)
    val = b.manifest["validation"]
    assert val["passed"] and (val["atol"], val["rtol"]) == (1e-5, 1e-4)
    # the activations really are large, so a fixed absolute bound of 1e-4 would have been tight
    from mpt_export.export.torchside import adapters_from_bank
    from mpt_export.export.reference import peft_model_for

    ref_model, _, _ = load_base_model(tmp_path / "base")
    ck, _ = adapters_from_bank(b.task_bank())[0]
    ref = peft_seq2seq_forward(peft_model_for(ref_model, ck), np.array([[5, 6, 7, 8]]), np.array([[9, 10]]), 0)
    assert max(np.abs(v).max() for k, v in ref.items() if k.startswith("cross.")) > 10
    assert np.abs(ref["encoder_hidden_states"]).max() > 10
    # a planted error still fails on this model
    with pytest.raises(ValidationError):
        _validate(b, planted(ref_model, "t5", 1.01), b.task_bank(), tolerance("float32"), 1, "cpu", None)


def test_verify_against_a_changed_base_model_fails_with_numbers(llama, tmp_path):
    model, _, _ = load_base_model(llama.base)
    changed = tmp_path / "changed"
    shutil.copytree(llama.base, changed)
    planted(model, "llama", 1.01).save_pretrained(str(changed))  # same config: only the weights differ
    res = cli("verify", llama.bundle, "--base-model", changed, "--seed", "3")
    assert_clean_failure(res, "differ from PEFT beyond atol 1e-05 + rtol 0.0001", "max rel", "allowed")
    res = cli("verify", llama.bundle, "--base-model", llama.base, "--seed", "3")
    assert res.returncode == 0 and "rtol 0.0001" in " ".join(res.stdout.split())


def test_tolerance_options(llama, tmp_path):
    out = tmp_path / "b"
    res = cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out", out,
                  "--rtol", "1e-3", "--atol", "0", "--seed", "2")
    assert res.returncode == 0, res.stderr
    val = json.loads((out / "manifest.json").read_text())["validation"]
    assert (val["atol"], val["rtol"]) == (0.0, 1e-3)
    assert_clean_failure(cli("export", "--base-model", llama.base, "--adapter", str(llama.source), "--out",
                                 tmp_path / "c", "--rtol", "nan"), "--rtol must be a finite number")

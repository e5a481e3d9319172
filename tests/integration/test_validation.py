"""Validation judges each output against its own magnitude: healthy models with large activations pass by default,
a planted 1% error in one attention projection fails on every architecture."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import mpt_export
from support import planted, cli
from mpt_export.errors import ValidationError
from mpt_export.export.api import validate_against_peft
from mpt_export.export.torchside import load_base_model
from mpt_export.export.precision import DEFAULT_TOL, tolerance
from support import assert_clean_failure, no_output_left

ARCHS = ["llama", "llama-gqa", "mistral", "qwen2", "gpt2", "t5", "flan-t5"]


@pytest.mark.parametrize("arch", ARCHS)
def test_planted_one_percent_error_fails_on_every_architecture(make_case, arch):
    case = make_case(arch)
    with mpt_export.load_bundle(case.bundle) as b:
        model, _, _ = load_base_model(case.base)
        bank = b.task_bank()
        healthy = validate_against_peft(b, model, bank, tolerance("float32"), 7, "cpu", None)  # same inputs: passes
        assert healthy["passed"] and healthy["rule"].startswith("max|a-b| <= atol + rtol")
        with pytest.raises(ValidationError, match="differ from PEFT beyond atol") as e:
            validate_against_peft(b, planted(model, arch, 1.01), bank, tolerance("float32"), 7, "cpu", None)
        rep = e.value.report
        worst = max(max(c["logits_max_rel"], c["kv_max_rel"]) for c in rep["cases"])
        assert worst > 10 * DEFAULT_TOL["float32"]["rtol"], worst  # caught with a wide margin, not by luck


def test_healthy_t5_with_large_activations_passes_by_default(make_case):
    """Real T5 checkpoints have activations of tens to thousands; fp32 rounding grows with them (the t5 case's base
    has them: support.large_activations)."""
    from mpt_export.export.torchside import adapters_from_bank
    from mpt_export.export.reference import peft_model_for, peft_seq2seq_forward

    case = make_case("t5", 2)
    b = mpt_export.load_bundle(case.bundle)
    val = b.manifest["validation"]
    assert val["passed"] and (val["atol"], val["rtol"]) == (1e-5, 1e-4)
    # the activations really are large, so a fixed absolute bound of 1e-4 would have been tight
    ref_model, _, _ = load_base_model(case.base)
    ck, _ = adapters_from_bank(b.task_bank())[0]
    ref = peft_seq2seq_forward(peft_model_for(ref_model, ck), np.array([[5, 6, 7, 8]]), np.array([[9, 10]]), 0)
    assert max(np.abs(v).max() for k, v in ref.items() if k.startswith("cross.")) > 10
    assert np.abs(ref["encoder_hidden_states"]).max() > 10
    # a planted error still fails on this model
    with pytest.raises(ValidationError):
        validate_against_peft(b, planted(ref_model, "t5", 1.01), b.task_bank(), tolerance("float32"), 1, "cpu", None)


def test_verify_against_a_changed_base_model_fails_with_numbers(llama, tmp_path):
    model, _, _ = load_base_model(llama.base)
    changed = tmp_path / "changed"
    shutil.copytree(llama.base, changed)
    planted(model, "llama", 1.01).save_pretrained(str(changed))  # same config: only the weights differ
    res = cli("verify", llama.bundle, "--base-model", changed, "--seed", "3")
    assert_clean_failure(res, "differ from PEFT beyond atol 1e-05 + rtol 0.0001", "max rel", "allowed")
    res = cli("verify", llama.bundle, "--base-model", llama.base, "--seed", "3")
    assert res.returncode == 0 and "rtol 0.0001" in " ".join(res.stdout.split())


def test_tolerance_and_provider_are_checked_before_the_weights_are_read(llama, tmp_path):
    """(--rtol/--atol reaching the manifest: test_precision.py::test_export_quantize_int8_cli.)"""
    # options are checked before the weights are read: a corrupt weights file is not what these report
    broken = tmp_path / "broken"
    shutil.copytree(llama.base, broken)
    for f in broken.glob("*.safetensors"):
        f.write_bytes(b"not safetensors")
    for bad, says in ((["--rtol", "nan"], "--rtol must be a finite number"),
                      (["--provider", "bogus"], "provider 'bogus' (bogus) is not available here")):
        out = tmp_path / "c"
        assert_clean_failure(cli("export", "--base-model", broken, "--adapter", str(llama.source), "--out", out, *bad),
                             says)
        assert no_output_left(out)

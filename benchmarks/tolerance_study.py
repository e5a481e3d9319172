"""How the validation tolerance defaults were chosen (``precision.DEFAULT_TOL``): healthy export error vs a planted
error, per architecture and dtype, as relative error (max|a-b| / max|ref|, per output, worst output reported).

For each tiny test architecture (and T5 with realistic large activations) the script exports an fp32 and an fp16
bundle, validates them against PEFT with a zero tolerance (to read the numbers), then plants an error in the
reference model — every element of one mid-depth attention projection (q, k, v and o in turn) scaled by 1.01 for
fp32, 1.10 for fp16 — and reads the smallest worst-output relative error over the four projections. A good ``rtol``
sits well above every healthy number and well below every planted one.

    .venv/bin/python benchmarks/tolerance_study.py [--workdir build/tolerance] [--archs llama,gpt2,...]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

CASES = [("llama", None, 1.0), ("llama-gqa", None, 1.0), ("mistral", None, 1.0), ("qwen2", None, 1.0),
         ("gpt2", None, 1.0), ("t5", 1, 1.0), ("t5", 2, 1.0), ("flan-t5", 2, 1.0), ("t5", 2, 10.0),
         ("flan-t5", 1, 10.0)]
PROJ = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"], "gpt2": ["c_attn", "c_proj"],
        "t5": ["SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o"]}


def projections(model, arch: str, layers: int):
    """(label, parameter) of each attention projection at mid depth (the decoder's for T5)."""
    mid = layers // 2
    if arch in ("t5", "flan-t5"):
        block = model.decoder.block[mid].layer[0]
        return [(f"decoder.{mid}.{n}", getattr(block.SelfAttention, n.split(".")[1]).weight) for n in PROJ["t5"]]
    if arch == "gpt2":
        attn = model.transformer.h[mid].attn
        return [(f"h.{mid}.attn.{n}", getattr(attn, n).weight) for n in PROJ["gpt2"]]
    attn = model.model.layers[mid].self_attn
    return [(f"layers.{mid}.{n}", getattr(attn, n).weight) for n in PROJ["llama"]]


def large_activations(model, scale: float) -> None:
    """Real T5 checkpoints carry activations of tens to thousands: scale the embedding, the final norms and the
    FFN outputs so the tiny model's hidden states and KV reach that range."""
    import torch

    with torch.no_grad():
        model.shared.weight.mul_(scale)
        for stack in (model.encoder, model.decoder):
            stack.final_layer_norm.weight.mul_(scale)
            for blk in stack.block:
                blk.layer[-1].DenseReluDense.wo.weight.mul_(3.0)


def worst_rel(summary: dict) -> float:
    keys = ("logits_max_rel", "kv_max_rel", "encoder_max_rel")
    return max(c.get(k, 0.0) for c in summary["cases"] for k in keys)


def study(workdir: Path, arch: str, nts, act_scale: float, layers: int = 2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    import mpt_export
    from mpt_export.tools.demo import SEQ2SEQ_ARCHS, make_base_model, make_source_adapter
    from mpt_export.errors import ValidationError
    from mpt_export.export.api import validate_against_peft
    from mpt_export.export.torchside import load_base_model

    seq2seq = arch in SEQ2SEQ_ARCHS
    root = workdir / f"{arch}-{nts}-{act_scale:g}"
    model = make_base_model(root / "base", arch=arch, hidden=32, layers=layers, heads=4, max_positions=64)
    if act_scale != 1.0:
        large_activations(model, act_scale)
        model.save_pretrained(str(root / "base"))
    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    make_source_adapter(auto.from_pretrained(str(root / "base")), root / "src", num_tasks=2, num_virtual_tokens=5,
                        num_ranks=2, task_type="SEQ_2_SEQ_LM" if seq2seq else "CAUSAL_LM",
                        num_transformer_submodules=nts)
    out = {"arch": arch, "nts": nts, "activation_scale": act_scale}
    zero = {"atol": 0.0, "rtol": 0.0}
    for dtype, factor in (("fp32", 1.01), ("fp16", 1.10)):
        b = mpt_export.export_bundle(root / "base", [f"a,b={root / 'src'}"], root / f"bundle-{dtype}", dtype=dtype,
                                     validate=False, force=True)
        ref, _, _ = load_base_model(root / "base")
        bank = b.task_bank()
        try:
            healthy = validate_against_peft(b, ref, bank, zero, 0, "cpu", None)
        except ValidationError as e:
            healthy = e.report
        mags = [c for c in healthy["cases"]]
        planted = {}
        for label, _ in projections(ref, arch, layers):
            bad = copy.deepcopy(ref)
            with torch.no_grad():
                dict(projections(bad, arch, layers))[label].mul_(factor)
            try:
                rep = validate_against_peft(b, bad, bank, zero, 0, "cpu", None)
            except ValidationError as e:
                rep = e.report
            planted[label] = worst_rel(rep)
        out[dtype] = {"healthy_worst_rel": worst_rel(healthy), "healthy_worst_abs": max(
            max(c["logits_max_abs"], c["kv_max_abs"]) for c in mags),
            "planted_min_worst_rel": min(planted.values()), "planted": planted}
        b.close()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="build/tolerance")
    ap.add_argument("--archs", default=None, help="comma-separated subset of: " + ",".join(sorted({c[0] for c in CASES})))
    args = ap.parse_args(argv)
    from mpt_export.storage.ownership import claim_workdir

    workdir = claim_workdir(Path(args.workdir), "tolerance-workdir")
    pick = set(args.archs.split(",")) if args.archs else None
    rows = [study(workdir, a, n, s) for a, n, s in CASES if pick is None or a in pick]
    print(f"{'arch':<10}{'nts':>4}{'act':>5} | {'fp32 healthy':>13}{'fp32 planted':>13} | {'fp16 healthy':>13}"
          f"{'fp16 planted':>13}")
    for r in rows:
        print(f"{r['arch']:<10}{str(r['nts']):>4}{r['activation_scale']:>5g} | {r['fp32']['healthy_worst_rel']:>13.2e}"
              f"{r['fp32']['planted_min_worst_rel']:>13.2e} | {r['fp16']['healthy_worst_rel']:>13.2e}"
              f"{r['fp16']['planted_min_worst_rel']:>13.2e}")
    (workdir / "study.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())

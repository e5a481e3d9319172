"""``export_bundle`` and ``verify_bundle``: the library functions behind ``mpt-export export`` / ``verify``."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..basemodel import base_arch, check_same_base, identity, tokenizer_files
from ..bundle import FORMAT, Bundle, load_bundle, staging_dir, write_manifest
from ..checkpoint import AdapterCheckpoint, TaskBank, build_task_bank
from ..errors import BaseModelError, InputError, MissingDependencyError
from .backbone import DEFAULT_OPSET, export_backbone
from .composer import write_composer


def _require_export_deps():
    try:
        import onnx  # noqa: F401
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            f"exporting needs the export extra ({e.name} is missing): pip install 'mpt-export[export]' "
            "(install torch==2.13.0 first for the CPU build)"
        ) from None


def tool_versions() -> dict:
    import importlib.metadata as md

    out = {"mpt_export": __version__}
    for pkg in ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def load_base_model(path: str | Path, attn_implementation: str = "eager"):
    """The HF model with its LM head (causal or seq2seq) in fp32, eval mode; eager attention by default (SDPA with a
    dynamic query length does not export)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg, arch = base_arch(path)
    auto = AutoModelForSeq2SeqLM if arch.task_type == "SEQ_2_SEQ_LM" else AutoModelForCausalLM
    if arch.task_type == "SEQ_2_SEQ_LM":
        attn_implementation = "eager"  # T5's relative position bias needs the eager attention path
    try:
        model = auto.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=torch.float32)
    except Exception as e:
        raise BaseModelError(
            f"could not load the base model from {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            "expected a complete save_pretrained directory (config.json + weights)"
        ) from None
    return model.eval(), cfg, arch


def adapters_from_bank(bank: TaskBank) -> list[tuple[AdapterCheckpoint, list[str]]]:
    """Regroup a bank into PEFT-shaped adapters (tasks of one source sharing one P* and one rank), so PEFT can be
    rebuilt from a bundle alone."""
    groups: dict[tuple, list] = {}
    for t in bank.tasks:
        groups.setdefault((t.source, t.shared, t.rank), []).append(t)
    out = []
    for (src, si, _), tasks in groups.items():
        P = bank.shared[si]
        nts = bank.num_transformer_submodules
        cfg = {"task_type": bank.task_type, "num_virtual_tokens": P.shape[0] // nts, "num_transformer_submodules": nts,
               "token_dim": P.shape[1], "num_tasks": len(tasks), "num_ranks": tasks[0].rank}
        ck = AdapterCheckpoint(Path(src or "bundle"), cfg, "tasks.safetensors", P,
                               np.stack([t.cols for t in tasks]), np.stack([t.rows for t in tasks]))
        out.append((ck, [t.name for t in tasks]))
    return out


def _validate(bundle_dir: Path, model, bank: TaskBank, atol: float, seed, provider: str, on_step) -> dict:
    from .reference import peft_model_for
    from .validate import validate_causal, validate_seq2seq

    peft_models, index = {}, {}
    for ck, names in adapters_from_bank(bank):
        pm = peft_model_for(model, ck)
        for i, n in enumerate(names):
            peft_models[n], index[n] = pm, i
    session = Bundle(bundle_dir, json.loads((bundle_dir / "manifest.json").read_text())).session(provider=provider)
    fn = validate_seq2seq if bank.task_type == "SEQ_2_SEQ_LM" else validate_causal
    return fn(session, peft_models, index, vocab=session.vocab_size, atol=atol, seed=seed, on_step=on_step)


def export_bundle(
    base_model: str | Path,
    adapters: list[str],
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    dtype: str = "fp32",
    quantize: str | None = None,
    min_agreement: float | None = None,
    validate: bool = True,
    force: bool = False,
    seed: int | None = None,
    provider: str = "cpu",
    on_step=None,
) -> Bundle:
    """Export PEFT MPT adapters over ``base_model`` into one validated bundle at ``out``.

    ``adapters`` are ``[NAMES=]DIR`` specs (``"sst2,mnli=dir_src"``); ``dtype`` fp32, fp16 or bf16 (see
    ``precision``; the reference stays PEFT in fp32, ``atol`` defaults per dtype). Nothing is written at ``out``
    unless every step, validation included, succeeds."""
    from ..bundle import check_output_path
    from .precision import DEFAULT_ATOL as ATOLS
    from .precision import canonical_dtype

    step = on_step or (lambda s: None)
    out = Path(out)
    if quantize is not None:
        return _export_quantized(base_model, adapters, out, quantize, min_agreement, dtype=dtype, opset=opset,
                                 atol=atol, validate=validate, force=force, seed=seed, provider=provider,
                                 on_step=on_step)
    dtype = canonical_dtype(dtype)
    atol = ATOLS[dtype] if atol is None else float(atol)
    check_output_path(out, force)  # fail before any heavy work
    if dtype == "bfloat16" and validate and provider == "cpu":
        raise InputError(
            "bf16 graphs cannot be validated on ONNX Runtime's CPU provider (it has no bf16 kernels); validate on a "
            "GPU provider (--provider cuda) or pass --no-validate and check the engine with `mpt-export verify` there"
        )
    cfg, arch = base_arch(base_model)
    bank, ckpts = build_task_bank(adapters, hidden_size=arch.hidden_size, task_type=arch.task_type)
    _require_export_deps()
    step("load base model")
    model, cfg, arch = load_base_model(base_model)  # fp32: PEFT's reference runs on it
    export_model = model
    if dtype != "float32":
        import copy

        from .precision import to_half

        export_model = to_half(copy.deepcopy(model), dtype)
    timings = {}
    with staging_dir(out, force) as tmp:
        t0 = time.perf_counter()
        if arch.task_type == "SEQ_2_SEQ_LM":
            from .seq2seq import WEIGHTS_FILE, export_seq2seq

            step("export encoder and decoder")
            sio = export_seq2seq(export_model, arch, tmp, opset=opset)
            real_opset = sio.pop("opset")
            graphs = {"encoder": {"file": "encoder.onnx", "external_data": WEIGHTS_FILE, **sio["encoder"]},
                      "decoder": {"file": "decoder.onnx", "external_data": WEIGHTS_FILE, **sio["decoder"]}}
        else:
            step("export backbone")
            bio = export_backbone(export_model, arch, tmp / "backbone.onnx", opset=opset)
            real_opset = bio.pop("opset")
            graphs = {"backbone": {"file": "backbone.onnx", "external_data": "backbone.onnx.data", **bio}}
        timings["backbone_export_s"] = round(time.perf_counter() - t0, 2)
        step("write composer and task bank")
        cio = write_composer(tmp / "composer.onnx", arch.hidden_size, real_opset)
        bank.save(tmp / "tasks.safetensors")
        tok = tokenizer_files(base_model)
        if tok:
            (tmp / "tokenizer").mkdir()
            for f in tok:
                shutil.copy2(f, tmp / "tokenizer" / f.name)
        manifest = {
            "format": FORMAT,
            "created_by": tool_versions(),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "task_type": arch.task_type,
            "dtype": dtype,
            "opset": real_opset,
            "base_model": identity(base_model),
            "num_transformer_submodules": bank.num_transformer_submodules,
            "graphs": {**graphs, "composer": {"file": "composer.onnx", **cio}},
            "tasks": bank.manifest_entries(),
            "adapters": [ck.summary() for ck in ckpts],
            "validation": None,
        }
        write_manifest(tmp, manifest)
        if validate:
            t0 = time.perf_counter()
            manifest["validation"] = _validate(tmp, model, bank, atol, seed, provider, step)
            timings["validation_s"] = round(time.perf_counter() - t0, 2)
        manifest["timings"] = timings
        manifest = write_manifest(tmp, manifest)
    return Bundle(out, manifest)


def _export_quantized(base_model, adapters, out: Path, quantize: str, min_agreement, dtype: str, **kw) -> Bundle:
    """``--quantize int8``: an fp32 bundle in a temporary sibling (validated against PEFT), then its int8 copy at
    ``out`` (checked against the fp32 one); the fp32 bundle is removed."""
    import tempfile

    from ..bundle import check_output_path
    from ..quantize import DEFAULT_MIN_AGREEMENT, quantize_bundle
    from .precision import canonical_dtype

    if quantize != "int8":
        raise InputError(f"unknown --quantize {quantize!r}; the only scheme is int8 (dynamic, for CPUs)")
    if canonical_dtype(dtype) != "float32":
        raise InputError("--quantize int8 starts from fp32 weights; drop --dtype or quantize an fp32 bundle")
    check_output_path(out, kw["force"])
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.fp32-", dir=out.parent))
    try:
        fp32 = export_bundle(base_model, adapters, work / "bundle", dtype="fp32", **kw)
        return quantize_bundle(fp32.path, out, min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None
                               else min_agreement, force=kw["force"], on_step=kw.get("on_step"))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def verify_bundle(path: str | Path, base_model: str | Path | None = None, atol: float | None = None,
                  seed: int | None = None, provider: str = "cpu", on_step=None) -> dict:
    """Checksums always; with ``base_model``, its identity and parity against PEFT, recomputed from the bundle."""
    b = load_bundle(path)
    result = {"path": str(b.path), "files": len(b.manifest["files"]), "checksums": "ok", "tasks": b.tasks}
    if base_model is None:
        return result
    check_same_base(base_model, b.base_model)
    quant = b.manifest.get("quantization")
    if quant and atol is None:
        rep = quant.get("report", {})
        result["validation"] = None
        result["note"] = (f"int8 bundle: its check is greedy-token agreement with the fp32 bundle "
                          f"({rep.get('greedy_agreement', 0):.1%} when it was written), not an abs tolerance against "
                          "PEFT; pass --atol to compare its logits with PEFT anyway")
        return result
    _require_export_deps()
    model, _, _ = load_base_model(base_model)
    from .precision import DEFAULT_ATOL

    tol = atol if atol is not None else (b.manifest.get("validation") or {}).get(
        "atol", DEFAULT_ATOL[b.manifest.get("dtype", "float32")])
    result["validation"] = _validate(b.path, model, b.task_bank(), tol, seed, provider, on_step)
    return result

"""``export_bundle`` and ``verify_bundle``: the library functions behind ``mpt-export export`` / ``verify``."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from .. import __version__
from ..basemodel import base_arch, check_same_base, identity
from ..atomic import check_path_text, check_replaceable, fault_point, replace_dir, resolve_output
from ..bundle import FORMAT, Bundle, load_bundle, write_manifest
from ..checkpoint import AdapterCheckpoint, build_task_bank
from ..taskbank import TaskBank
from ..errors import BaseModelError, InputError, MissingDependencyError
from .backbone import DEFAULT_OPSET, export_backbone
from .composer import write_composer
from .tokenizer import write_tokenizer


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


def _validate(bundle: Bundle, model, bank: TaskBank, tol, seed, provider: str, on_step) -> dict:
    from .reference import peft_model_for
    from .validate import validate_causal, validate_seq2seq

    peft_models, index = {}, {}
    for ck, names in adapters_from_bank(bank):
        pm = peft_model_for(model, ck)
        for i, n in enumerate(names):
            peft_models[n], index[n] = pm, i
    session = bundle.session(provider=provider)
    fn = validate_seq2seq if bank.task_type == "SEQ_2_SEQ_LM" else validate_causal
    return fn(session, peft_models, index, vocab=session.vocab_size, tol=tol, seed=seed, on_step=on_step)


def export_inputs(base_model, adapters) -> list[tuple[str, Path]]:
    """What an export reads: its output must not be (or hold) any of these."""
    from ..checkpoint import parse_adapter_spec

    return [("base model", Path(base_model))] + [("adapter", parse_adapter_spec(a)[1]) for a in adapters]


def export_bundle(
    base_model: str | Path,
    adapters: list[str],
    out: str | Path,
    opset: int = DEFAULT_OPSET,
    atol: float | None = None,
    rtol: float | None = None,
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
    ``precision``; the reference stays PEFT in fp32; an output passes when ``max|a-b| <= atol + rtol * max|ref|``,
    defaults per dtype in ``precision.DEFAULT_TOL``). Nothing is written at ``out``
    unless every step, validation included, succeeds."""
    from .precision import canonical_dtype, tolerance

    step = on_step or (lambda s: None)
    check_path_text(Path(out))
    out = resolve_output(out)  # what the user named, as the kernel resolves it ("link/..", ".")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < 18:
        raise InputError(f"--opset must be an integer >= 18 (torch's dynamo exporter writes 18 and later), got {opset!r}")
    if min_agreement is not None and not 0 <= min_agreement <= 1:
        raise InputError(f"--min-agreement must be in [0, 1], got {min_agreement}")
    if quantize is not None:
        return _export_quantized(base_model, adapters, out, quantize, min_agreement, dtype=dtype, opset=opset,
                                 atol=atol, rtol=rtol, validate=validate, force=force, seed=seed, provider=provider,
                                 on_step=on_step)
    dtype = canonical_dtype(dtype)
    tol = tolerance(dtype, atol, rtol)
    inputs = export_inputs(base_model, adapters)
    check_replaceable(out, "bundle", force, inputs)  # fail before any heavy work
    if dtype == "bfloat16" and validate and provider == "cpu":
        raise InputError(
            "bf16 graphs cannot be validated on ONNX Runtime's CPU provider (it has no bf16 kernels); validate on a "
            "GPU provider (--provider cuda) or pass --no-validate and check the engine with `mpt-export verify` there"
        )
    cfg, arch = base_arch(base_model)
    bank, ckpts = build_task_bank(adapters, hidden_size=arch.hidden_size, task_type=arch.task_type,
                                  max_positions=arch.max_positions)
    _require_export_deps()
    import onnx

    if opset > onnx.defs.onnx_opset_version():
        raise InputError(f"--opset {opset} is newer than this onnx package knows ({onnx.defs.onnx_opset_version()}); "
                         "choose 18 or another opset it supports")
    step("load base model")
    model, cfg, arch = load_base_model(base_model)  # fp32: PEFT's reference runs on it
    export_model = model
    if dtype != "float32":
        import copy

        from .precision import to_half

        export_model = to_half(copy.deepcopy(model), dtype)
    timings = {}
    with replace_dir(out, "bundle", force, inputs) as tmp:
        tokenizer_info = write_tokenizer(base_model, tmp / "tokenizer")  # first: a conversion error costs nothing
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
        fault_point("graphs exported")
        step("write composer and task bank")
        cio = write_composer(tmp / "composer.onnx", arch.hidden_size, real_opset)
        bank.save(tmp / "tasks.safetensors")
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
            "tokenizer": tokenizer_info,
            "validation": None,
        }
        manifest = write_manifest(tmp, manifest)
        if validate:
            t0 = time.perf_counter()
            staged = Bundle(tmp, manifest)
            manifest["validation"] = _validate(staged, model, bank, tol, seed, provider, step)
            timings["validation_s"] = round(time.perf_counter() - t0, 2)
        manifest["timings"] = timings
        known = dict(manifest["files"])  # nothing but the manifest changed since it was hashed
        manifest = write_manifest(tmp, manifest, known=known)
    return load_bundle(out, verify=False)


def _export_quantized(base_model, adapters, out: Path, quantize: str, min_agreement, dtype: str, **kw) -> Bundle:
    """``--quantize int8``: an fp32 bundle in a staging directory beside ``out`` (validated against PEFT), then its
    int8 copy at ``out`` (checked against the fp32 one); the fp32 bundle is removed. ``out`` stays locked for
    writers throughout."""
    from ..atomic import staging
    from ..quantize import DEFAULT_MIN_AGREEMENT, quantize_bundle
    from .precision import canonical_dtype

    if quantize != "int8":
        raise InputError(f"unknown --quantize {quantize!r}; the only scheme is int8 (dynamic, for CPUs)")
    if canonical_dtype(dtype) != "float32":
        raise InputError("--quantize int8 starts from fp32 weights; drop --dtype or quantize an fp32 bundle")
    inputs = export_inputs(base_model, adapters)
    check_replaceable(out, "bundle", kw["force"], inputs)
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    # the fp32 bundle lives in a locked staging directory beside out: removed at the end, or by the next write
    with staging(out) as (work, _):
        fp32 = export_bundle(base_model, adapters, work / "bundle", dtype="fp32", **kw)
        fp32.close()
        return quantize_bundle(work / "bundle", out, min_agreement=DEFAULT_MIN_AGREEMENT if min_agreement is None
                               else min_agreement, force=kw["force"], on_step=kw.get("on_step"), inputs=inputs)


def verify_bundle(path: str | Path, base_model: str | Path | None = None, atol: float | None = None,
                  seed: int | None = None, provider: str = "cpu", on_step=None, rtol: float | None = None) -> dict:
    """Checksums always; with ``base_model``, its identity and parity against PEFT, recomputed from the bundle
    (tolerance: the one the bundle was exported with, unless ``atol``/``rtol`` are given)."""
    with load_bundle(path) as b:
        result = {"path": str(b.path), "files": len(b.manifest["files"]), "checksums": "ok", "tasks": b.tasks}
        if base_model is None:
            return result
        check_same_base(base_model, b.base_model)
        quant = b.manifest.get("quantization")
        if quant and atol is None and rtol is None:
            rep = quant.get("report", {})
            result["validation"] = None
            result["note"] = (f"int8 bundle: its check is greedy-token agreement with the fp32 bundle "
                              f"({rep.get('greedy_agreement', 0):.1%} teacher-forced, "
                              f"{rep.get('free_running_agreement', 0):.1%} free-running when it was written), not a "
                              "tolerance against PEFT; pass --atol/--rtol to compare its logits with PEFT anyway")
            return result
        _require_export_deps()
        model, _, _ = load_base_model(base_model)
        from .precision import tolerance

        recorded = b.manifest.get("validation") or {}
        tol = tolerance(b.manifest.get("dtype", "float32"),
                        atol if atol is not None else recorded.get("atol"),
                        rtol if rtol is not None else recorded.get("rtol"))
        result["validation"] = _validate(b, model, b.task_bank(), tol, seed, provider, on_step)
        return result

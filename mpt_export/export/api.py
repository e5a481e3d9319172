"""``export_bundle`` and ``verify_bundle``: the library functions behind ``mpt-export export`` / ``verify``."""

from __future__ import annotations

import importlib.metadata as md
import os
import time
from pathlib import Path

from ..version import __version__
from ..source.basemodel import base_arch, check_same_base, identity
from ..source.hub import hub_origin, resolve, resolve_adapter_specs
from ..storage.atomic import fault_point, replace_dir, resolve_output, staging
from ..storage.ownership import check_path_text, check_replaceable
from ..bundle.info import BundleInfo
from ..bundle.reader import Bundle, load_bundle
from ..bundle.manifest import FORMAT, write_manifest
from ..source.adapters import build_task_bank, parse_adapter_spec
from ..bundle.bankfile import write_file
from ..bundle.taskbank import TaskBank
from ..errors import InputError
from ..runtime.memory import peak_rss_mib, release_freed_memory, rss_mib
from .options import ExportOptions
from .quiet import third_party_quiet
from .composer import write_composer
from .scoring import scoring_graphs
from .tokenizer import write_tokenizer
from .torchside import (ISOLATE_BYTES, load_base_model, references, require_export_deps, run_isolated, torch_phase, weight_bytes)
from ..runtime.onnxruntime import resolve_provider
from ..runtime.options import is_cpu_provider
from .precision import tolerance
from .quantize import quantize_bundle
from .validate import compare_causal, compare_seq2seq


def tool_versions() -> dict:
    out = {"mpt_export": __version__}
    for pkg in ("torch", "transformers", "peft", "onnx", "onnxscript", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def validate_against_peft(bundle: Bundle, model, bank: TaskBank, tol, seed, provider: str, on_step) -> dict:
    """PEFT over ``model`` vs the bundle. References are computed first; when ``model`` is handed over in a list
    (``[model]``, no other reference kept), it is freed before ONNX Runtime loads the graphs, so the weights are
    never held twice."""
    if isinstance(model, list):
        model = model.pop()
    cases = references(model, bank, seed, on_step)
    del model
    release_freed_memory()
    return _compare(bundle, cases, tol, provider, on_step)


def _compare(bundle: Bundle, cases, tol, provider: str, on_step) -> dict:
    """Every graph of the bundle that runs on ONNX Runtime (the traced one, and the fused one where there is one)
    against the references; -> the traced graph's report, with the fused graph's under ``fast_graph``."""
    compare = compare_seq2seq if cases.kind == "seq2seq" else compare_causal
    reports = {}
    for graph in ("plain", "fast") if bundle.info.fused else ("plain",):
        if graph == "fast" and not is_cpu_provider(provider):
            continue  # the fused graph runs on the CPU provider only
        session = bundle.session(provider=provider, prepack=False, graph=graph)  # weights read in place
        try:
            step = on_step if graph == "plain" or on_step is None else (lambda s: on_step(f"{s} (fused graph)"))
            reports[graph] = compare(session, cases, tol, step)
        finally:
            session.close()
    report = reports["plain"]
    if "fast" in reports:
        report["fast_graph"] = reports["fast"]
    return report


def resolve_sources(base_model, adapters: list[str], revision: str | None = None) -> tuple[Path, list[str]]:
    """Hugging Face Hub ids among the base model and the adapters, replaced by their local snapshots."""
    return resolve(base_model, "base model", revision), resolve_adapter_specs(list(adapters))


def export_inputs(base_model, adapters) -> list[tuple[str, Path]]:
    """What an export reads: its output must not be (or hold) any of these."""
    return [("base model", Path(base_model))] + [("adapter", parse_adapter_spec(a)[1]) for a in adapters]


def export_bundle(base_model: str | Path, adapters: list[str], out: str | Path, options: ExportOptions | None = None,
                  on_step=None, **fields) -> Bundle:
    """Export PEFT MPT adapters over ``base_model`` into one validated bundle at ``out``.

    ``adapters`` are ``[NAMES=]DIR`` specs (``"sst2,mnli=dir_src"``); ``options`` an :class:`ExportOptions`, or its
    fields as keywords (``dtype="fp16"``, ``force=True``, ...): ``dtype`` fp32, fp16 or bf16 (see ``precision``; the
    reference stays PEFT in fp32; an output passes when ``max|a-b| <= atol + rtol * max|ref|``, defaults per dtype
    in ``precision.DEFAULT_TOL``). Nothing is written at ``out`` unless every step, validation included, succeeds.

    Memory: the torch work (load in the export dtype, graph export, PEFT's reference outputs) runs first and its
    memory is gone before ONNX Runtime opens the graphs, so the weights are never held twice. ``isolate`` runs that
    work in a child process (default: when the weights are ``ISOLATE_BYTES`` or more), the only way to hand all of
    it back — torch's exporter, the safetensors mapping and the C heap keep pages after the model is freed."""
    o = options.with_(**fields) if options is not None else ExportOptions(**fields)
    step = on_step or (lambda s: None)
    check_path_text(Path(out))
    out = resolve_output(out)  # what the user named, as the kernel resolves it ("link/..", ".")
    asked = base_model
    base_model, adapters = resolve_sources(base_model, adapters, o.revision)
    origin = hub_origin(asked, o.revision, base_model)
    if o.quantize is not None:
        return _export_quantized(base_model, adapters, out, o, on_step)
    inputs, arch, bank, ckpts = _check_inputs(base_model, adapters, out, o)
    isolate = weight_bytes(base_model) >= ISOLATE_BYTES if o.isolate is None else o.isolate
    with replace_dir(out, "bundle", o.force, inputs) as tmp:
        spec = {"base_model": str(base_model), "dtype": o.dtype, "out": str(tmp), "opset": o.opset,
                "validate": o.validate, "seed": o.seed, "fast_graph": o.fast_graph}
        tokenizer_info, res = _torch_artifacts(tmp, base_model, bank, spec, isolate, step)
        timings = dict(res["timings"])
        manifest = _write_first_manifest(tmp, base_model, arch, bank, ckpts, o.dtype, res, tokenizer_info, origin,
                                         step)
        validation = _validation_report(tmp, manifest, res["cases"], o.tolerance, o.provider, step, timings) \
            if o.validate else None
        timings["isolated"] = bool(isolate)
        # nothing but the manifest changed since every file was hashed
        write_manifest(tmp, {**manifest, "validation": validation, "timings": timings}, known=dict(BundleInfo.of(manifest).files))
    return load_bundle(out, verify=False)


def check_export_inputs(base_model, adapters, out, options: ExportOptions | None = None):
    """What an export can check without torch (well under a second): the output replaceable, the validation's
    provider, the base model's configuration and architecture, the adapters read into a task bank and matched to it.
    The command line calls it before it loads torch; ``export_bundle`` calls it first.
    -> (inputs, arch, bank, checkpoints)"""
    o = options or ExportOptions()
    base_model, adapters = resolve_sources(base_model, adapters, o.revision)
    inputs = export_inputs(base_model, adapters)
    check_replaceable(Path(out), "bundle", o.force, inputs)  # fail before any heavy work
    if o.validate:  # the validation's provider must exist before the graphs are exported, not after

        resolve_provider(o.provider)
    cfg, arch = base_arch(base_model)
    bank, ckpts = build_task_bank(adapters, hidden_size=arch.hidden_size, task_type=arch.task_type,
                                  max_positions=arch.max_positions)
    return inputs, arch, bank, ckpts


def _check_inputs(base_model, adapters, out: Path, o: ExportOptions):
    """Everything checked before any heavy work (the options checked themselves): :func:`check_export_inputs`, then
    the export dependencies and the opset. -> (inputs, arch, bank, checkpoints)"""
    inputs, arch, bank, ckpts = check_export_inputs(base_model, adapters, out, o)
    require_export_deps()
    import onnx

    if o.opset > onnx.defs.onnx_opset_version():
        raise InputError(f"--opset {o.opset} is newer than this onnx package knows ({onnx.defs.onnx_opset_version()}); "
                         "choose 18 or another opset it supports")
    return inputs, arch, bank, ckpts


def _torch_artifacts(tmp: Path, base_model, bank: TaskBank, spec: dict, isolate: bool, step):
    """The tokenizer and task bank written into ``tmp``, then the torch phase (graphs exported, PEFT's references),
    in a child process when ``isolate``. -> (tokenizer info, the torch phase's result)"""
    tokenizer_info = write_tokenizer(base_model, tmp / "tokenizer")  # first: a conversion error costs nothing
    write_file(tmp / "tasks.safetensors", bank)
    res = (run_isolated if isolate else torch_phase)(spec, bank, step)
    fault_point("graphs exported")
    return tokenizer_info, res


def _write_first_manifest(tmp: Path, base_model, arch, bank: TaskBank, ckpts, dtype: str, res: dict,
                          tokenizer_info, origin: dict | None, step) -> dict:
    """The composer graph and the manifest (no validation report yet), with every file's sha256. ``origin``: where
    a Hugging Face Hub base model came from."""
    step("write composer and task bank")
    cio = write_composer(tmp / "composer.onnx", arch.hidden_size, res["opset"])
    graphs = dict(res["graphs"])
    fast, skipped = graphs.pop("backbone_fast", None), graphs.pop("backbone_fused_skipped", None)
    manifest = {
        "format": FORMAT,
        "created_by": tool_versions(),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task_type": arch.task_type,
        "dtype": dtype,
        "opset": res["opset"],
        "base_model": {**identity(base_model), **({"hub": origin} if origin else {})},
        "num_transformer_submodules": bank.num_transformer_submodules,
        "graphs": {**graphs, "composer": {"file": "composer.onnx", **cio}},
        **({"fast_graphs": {"backbone": fast}} if fast else {}),
        **({"fast_graph_skipped": skipped} if skipped else {}),
        **scoring_graphs(tmp, graphs, arch),
        "task_files": ["tasks.safetensors"],
        "adapters": [ck.summary() for ck in ckpts],
        "tokenizer": tokenizer_info,
        "validation": None,
    }
    return write_manifest(tmp, manifest)


def _validation_report(tmp: Path, manifest: dict, cases, tol, provider: str, step, timings: dict) -> dict:
    """The staged bundle against PEFT's reference outputs; its time and memory go into ``timings``."""
    t0 = time.perf_counter()
    timings["validate_start_rss_mib"] = rss_mib()
    staged = Bundle(tmp, manifest)
    report = _compare(staged, cases, tol, provider, step)
    timings["validate_s"] = round(time.perf_counter() - t0, 2)
    timings["validate_peak_rss_mib"] = peak_rss_mib()  # the process's peak (this phase's when isolated)
    return report


def _export_quantized(base_model, adapters, out: Path, o: ExportOptions, on_step) -> Bundle:
    """``--quantize int8|int4|int8-dynamic``: an fp32 bundle in a staging directory beside ``out`` (validated against
    PEFT), then its quantized copy at ``out`` (checked against the fp32 one); the fp32 bundle is removed. ``out`` stays locked for
    writers throughout."""
    inputs = export_inputs(base_model, adapters)
    check_replaceable(out, "bundle", o.force, inputs)
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    # the fp32 bundle lives in a locked staging directory beside out: removed at the end, or by the next write
    with staging(out) as (work, _):
        fp32 = export_bundle(base_model, adapters, work / "bundle", o.unquantized(), on_step=on_step)
        fp32.close()
        return quantize_bundle(work / "bundle", out, o.quantization, force=o.force, on_step=on_step, inputs=inputs)


def verify_bundle(path: str | Path, base_model: str | Path | None = None, atol: float | None = None,
                  seed: int | None = None, provider: str = "cpu", on_step=None, rtol: float | None = None) -> dict:
    """Checksums always; with ``base_model``, its identity and parity against PEFT, recomputed from the bundle
    (tolerance: the one the bundle was exported with, unless ``atol``/``rtol`` are given)."""
    with load_bundle(path, trust_stamp=False) as b:  # every file hashed, whatever a stamp says
        result = {"path": str(b.path), "files": len(b.info.files), "checksums": "ok", "tasks": b.tasks}
        if base_model is None:
            return result
        base_model = resolve(base_model, "base model")  # a Hugging Face Hub id: its snapshot in the cache
        check_same_base(base_model, b.base_model)
        quant = b.info.quantization
        if quant and atol is None and rtol is None:
            rep = quant.get("report", {})
            result["validation"] = None
            result["note"] = (f"{quant.get('scheme') or quant.get('weights')} bundle: its check is greedy-token agreement with the fp32 bundle "
                              f"({rep.get('greedy_agreement', 0):.1%} teacher-forced, "
                              f"{rep.get('free_running_agreement', 0):.1%} free-running when it was written), not a "
                              "tolerance against PEFT; pass --atol/--rtol to compare its logits with PEFT anyway")
            return result
        require_export_deps()
        holder = [load_base_model(base_model)[0]]  # freed once PEFT's references are computed

        recorded = b.info.validation or {}
        tol = tolerance(b.info.dtype,
                        atol if atol is not None else recorded.get("atol"),
                        rtol if rtol is not None else recorded.get("rtol"))
        with third_party_quiet():  # PEFT's model and forward warn about transformers' deprecations
            result["validation"] = validate_against_peft(b, holder, b.task_bank(), tol, seed, provider, on_step)
        return result

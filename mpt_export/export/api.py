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
from ..errors import BaseModelError, ExportError, InputError, MissingDependencyError
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


def load_base_model(path: str | Path, attn_implementation: str = "eager", dtype: str = "float32"):
    """The HF model with its LM head (causal or seq2seq) in ``dtype`` (converted as it loads: a half export never
    holds an fp32 copy), eval mode; eager attention by default (SDPA with a dynamic query length does not export)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg, arch = base_arch(path)
    auto = AutoModelForSeq2SeqLM if arch.task_type == "SEQ_2_SEQ_LM" else AutoModelForCausalLM
    if arch.task_type == "SEQ_2_SEQ_LM":
        attn_implementation = "eager"  # T5's relative position bias needs the eager attention path
    try:
        model = auto.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=getattr(torch, dtype))
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
    """PEFT over ``model`` vs the bundle. References are computed first; when ``model`` is handed over in a list
    (``[model]``, no other reference kept), it is freed before ONNX Runtime loads the graphs, so the weights are
    never held twice. A half-precision model is cast to fp32 in place for the reference."""
    import gc

    from .reference import peft_model_for
    from .validate import compare_causal, compare_seq2seq, reference_causal, reference_seq2seq

    if isinstance(model, list):
        model = model.pop()
    if next(model.parameters()).dtype != _torch_float32():
        model.float()  # the reference is fp32 arithmetic (over the weights as exported)
    peft_models, index = {}, {}
    for ck, names in adapters_from_bank(bank):
        pm = peft_model_for(model, ck)
        for i, n in enumerate(names):
            peft_models[n], index[n] = pm, i
    vocab = int(bundle.base_model["vocab_size"])
    seq2seq = bank.task_type == "SEQ_2_SEQ_LM"
    if seq2seq:
        cases = reference_seq2seq(peft_models, index, vocab, int(bundle.base_model.get("decoder_start_token_id") or 0),
                                  seed, on_step)
    else:
        cases = reference_causal(peft_models, index, vocab, seed, on_step)
    del peft_models, pm, model
    gc.collect()
    release_freed_memory()
    session = bundle.session(provider=provider)
    try:
        return (compare_seq2seq if seq2seq else compare_causal)(session, cases, tol, on_step)
    finally:
        session.close()


def rss_mib() -> float:
    """This process's resident memory now (MiB; 0 where /proc is missing)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def peak_rss_mib() -> float:
    """This process's peak resident memory so far (MiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps freed heap pages otherwise, so the next big
    allocation — ONNX Runtime's weights — would add to the peak instead of reusing them)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _torch_float32():
    import torch

    return torch.float32


ISOLATE_BYTES = 256 * 2**20  # base-model weight files from this size on are exported in a child process


def weight_bytes(base_model) -> int:
    """Bytes of the base model's weight files (what the torch phase will hold)."""
    d = Path(base_model)
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()) \
        if d.is_dir() else 0


def torch_phase(spec: dict, bank: TaskBank, step) -> dict:
    """Load the base model in the export dtype, export its graphs into ``spec["out"]`` and, with ``validate``,
    compute PEFT's reference outputs on the validation inputs (fp32 arithmetic: a half model is cast up in place
    after the export). -> graphs (manifest entries), opset, cases, timings. Frees the model before returning."""
    import gc

    from .validate import reference_causal, reference_seq2seq

    tmp = Path(spec["out"])
    dtype = spec["dtype"]
    _require_export_deps()  # imported first, so the start figure is the libraries' own memory
    timings = {"torch_phase_start_rss_mib": rss_mib()}
    t0 = time.perf_counter()
    step("load base model")
    model, cfg, arch = load_base_model(spec["base_model"], dtype=dtype)  # in the export dtype: one copy
    if dtype != "float32":
        from .precision import to_half

        to_half(model, dtype)
    timings["load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if arch.task_type == "SEQ_2_SEQ_LM":
        from .seq2seq import WEIGHTS_FILE, export_seq2seq

        step("export encoder and decoder")
        sio = export_seq2seq(model, arch, tmp, opset=spec["opset"])
        real_opset = sio.pop("opset")
        graphs = {"encoder": {"file": "encoder.onnx", "external_data": WEIGHTS_FILE, **sio["encoder"]},
                  "decoder": {"file": "decoder.onnx", "external_data": WEIGHTS_FILE, **sio["decoder"]}}
    else:
        step("export backbone")
        bio = export_backbone(model, arch, tmp / "backbone.onnx", opset=spec["opset"])
        real_opset = bio.pop("opset")
        graphs = {"backbone": {"file": "backbone.onnx", "external_data": "backbone.onnx.data", **bio}}
    timings["graph_export_s"] = round(time.perf_counter() - t0, 2)
    cases = None
    if spec["validate"]:
        from .reference import peft_model_for

        t0 = time.perf_counter()
        if dtype != "float32":
            model.float()  # the reference is fp32 arithmetic over the weights as exported
        peft_models, index = {}, {}
        for ck, names in adapters_from_bank(bank):
            pm = peft_model_for(model, ck)
            for i, n in enumerate(names):
                peft_models[n], index[n] = pm, i
        if arch.task_type == "SEQ_2_SEQ_LM":
            start = getattr(model.config, "decoder_start_token_id", None)
            cases = reference_seq2seq(peft_models, index, arch.vocab_size, int(start or 0), spec["seed"], step)
        else:
            cases = reference_causal(peft_models, index, arch.vocab_size, spec["seed"], step)
        del peft_models, pm
        timings["reference_s"] = round(time.perf_counter() - t0, 2)
    del model
    gc.collect()
    release_freed_memory()
    timings["torch_phase_peak_rss_mib"] = peak_rss_mib()
    return {"graphs": graphs, "opset": int(real_opset), "cases": cases, "timings": timings}


def _child_main() -> None:
    """``python -m mpt_export.export.api``: the torch phase for a parent export. Reads (spec, bank) from stdin and
    writes progress, then the result or the error, as pickle frames to the file descriptor in argv[1] (a pipe from
    the parent that started it — internal data between our two processes, never from a client)."""
    import pickle
    import signal
    import sys

    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: never outlive the export that started us
    except (OSError, AttributeError):
        pass
    out = os.fdopen(int(sys.argv[1]), "wb")

    def send(msg):
        pickle.dump(msg, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    spec, bank = pickle.load(sys.stdin.buffer)
    try:
        send(("ok", torch_phase(spec, bank, lambda s: send(("step", s)))))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent, which reports it
        send(("error", type(e).__name__, str(e)))
    out.close()


def run_isolated(spec: dict, bank: TaskBank, step) -> dict:
    """``torch_phase`` in a child process (a fresh interpreter: no torch or ONNX Runtime state shared, the user's
    ``__main__`` never re-imported); its memory goes back to the system when it exits, before ONNX Runtime loads
    the graphs here. The child's stderr is kept and shown only if it fails."""
    import pickle
    import subprocess
    import sys
    import tempfile

    from .. import errors

    rfd, wfd = os.pipe()
    log = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mpt_export.export.api", str(wfd)], stdin=subprocess.PIPE,
                                stdout=log, stderr=log, pass_fds=(wfd,))
    finally:
        os.close(wfd)
    reader = os.fdopen(rfd, "rb")
    try:
        try:
            pickle.dump((spec, bank), proc.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        while True:
            try:
                msg = pickle.load(reader)
            except (EOFError, pickle.UnpicklingError):
                code = proc.wait()
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                hint = " — most likely out of memory" if code == -9 else ""
                log.seek(0)
                tail = log.read()[-600:].decode(errors="replace").strip()
                raise ExportError(f"the export process (load, graph export, reference) {how}{hint}; the output was "
                                  "not written" + (f". Its last output: {tail}" if tail else "")) from None
            if msg[0] == "step":
                step(msg[1])
            elif msg[0] == "ok":
                return msg[1]
            else:
                _, name, text = msg
                cls = getattr(errors, name, None)
                if isinstance(cls, type) and issubclass(cls, errors.MptExportError) and cls is not errors.ValidationError:
                    raise cls(text)
                if name == "KeyboardInterrupt":
                    raise KeyboardInterrupt
                raise ExportError(f"the export failed ({name}: {text.splitlines()[0][:300] if text else ''})")
    finally:
        reader.close()
        if proc.poll() is None:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def _compare(bundle: Bundle, cases, tol, provider: str, on_step) -> dict:
    from .validate import compare_causal, compare_seq2seq

    session = bundle.session(provider=provider, prepack=False)  # weights read in place: no packed copy
    try:
        return (compare_seq2seq if cases.kind == "seq2seq" else compare_causal)(session, cases, tol, on_step)
    finally:
        session.close()


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
    isolate: bool | None = None,
) -> Bundle:
    """Export PEFT MPT adapters over ``base_model`` into one validated bundle at ``out``.

    ``adapters`` are ``[NAMES=]DIR`` specs (``"sst2,mnli=dir_src"``); ``dtype`` fp32, fp16 or bf16 (see
    ``precision``; the reference stays PEFT in fp32; an output passes when ``max|a-b| <= atol + rtol * max|ref|``,
    defaults per dtype in ``precision.DEFAULT_TOL``). Nothing is written at ``out``
    unless every step, validation included, succeeds.

    Memory: the torch work (load in the export dtype, graph export, PEFT's reference outputs) runs first and its
    memory is gone before ONNX Runtime opens the graphs, so the weights are never held twice. ``isolate`` runs that
    work in a child process (default: when the weights are ``ISOLATE_BYTES`` or more), the only way to hand all of
    it back — torch's exporter, the safetensors mapping and the C heap keep pages after the model is freed."""
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
    if isolate is None:
        isolate = weight_bytes(base_model) >= ISOLATE_BYTES
    timings = {}
    with replace_dir(out, "bundle", force, inputs) as tmp:
        tokenizer_info = write_tokenizer(base_model, tmp / "tokenizer")  # first: a conversion error costs nothing
        bank.save(tmp / "tasks.safetensors")
        spec = {"base_model": str(base_model), "dtype": dtype, "out": str(tmp), "opset": opset,
                "validate": validate, "seed": seed}
        res = (run_isolated if isolate else torch_phase)(spec, bank, step)
        graphs, real_opset, cases = res["graphs"], res["opset"], res["cases"]
        timings.update(res["timings"])
        fault_point("graphs exported")
        step("write composer and task bank")
        cio = write_composer(tmp / "composer.onnx", arch.hidden_size, real_opset)
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
            timings["validate_start_rss_mib"] = rss_mib()
            staged = Bundle(tmp, manifest)
            manifest["validation"] = _compare(staged, cases, tol, provider, step)
            timings["validate_s"] = round(time.perf_counter() - t0, 2)
            timings["validate_peak_rss_mib"] = peak_rss_mib()  # the process's peak (this phase's when isolated)
        timings["isolated"] = bool(isolate)
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
        holder = [load_base_model(base_model)[0]]  # freed once PEFT's references are computed
        from .precision import tolerance

        recorded = b.manifest.get("validation") or {}
        tol = tolerance(b.manifest.get("dtype", "float32"),
                        atol if atol is not None else recorded.get("atol"),
                        rtol if rtol is not None else recorded.get("rtol"))
        result["validation"] = _validate(b, holder, b.task_bank(), tol, seed, provider, on_step)
        return result


if __name__ == "__main__":
    _child_main()

"""The torch side of an export: load the base model in the export dtype, export its graphs, compute PEFT's
reference outputs — in this process, or (:func:`run_isolated`) in a child process whose memory is all returned to
the system when it exits, before ONNX Runtime opens the graphs. Freeing the model in-process is not enough: torch's
exporter (onnxscript's rewriter rules keep the last matched graph and through it every weight), the memory-mapped
checkpoint and the C heap keep pages after the model is gone."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..source.basemodel import base_arch
from ..source.adapters import AdapterCheckpoint
from ..errors import BaseModelError, ExportError, MissingDependencyError, MptExportError
from ..runtime.memory import peak_rss_mib, release_freed_memory, rss_mib
from ..bundle.taskbank import TaskBank
from .backbone import export_backbone
from .quiet import quietly
from .. import errors as error_types
from .fusedgraph import write_fused_backbone
from .precision import to_half
from .reference import peft_model_for
from .seq2seq import export_seq2seq, share_weights, WEIGHTS_FILE
from .validate import reference_causal, reference_seq2seq


def require_export_deps():
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


@quietly
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


def references(model, bank: TaskBank, seed, on_step):
    """PEFT (over ``model``, one PeftModel per source adapter of ``bank``) on freshly drawn validation inputs: the
    reference outputs (``validate.Cases``) the bundle is compared with. fp32 arithmetic: a half-precision model is cast up in place."""
    import torch

    if next(model.parameters()).dtype != torch.float32:
        model.float()  # over the weights as exported
    peft_models, index = {}, {}
    for ck, names in adapters_from_bank(bank):
        pm = peft_model_for(model, ck)
        for i, n in enumerate(names):
            peft_models[n], index[n] = pm, i
    vocab = int(model.config.vocab_size)
    if bank.task_type == "SEQ_2_SEQ_LM":
        start = int(getattr(model.config, "decoder_start_token_id", None) or 0)
        return reference_seq2seq(peft_models, index, vocab, start, seed, on_step)
    return reference_causal(peft_models, index, vocab, seed, on_step)


def token_embeddings(model, bank: TaskBank) -> dict:
    """The tables that embed token ids where PEFT runs an encoder-decoder: PEFT's own ``word_embeddings`` (the one it
    finds in the model, T5's ``encoder.embed_tokens``) for the encoder's ids, and for the decoder's ids too when the
    prompt has a decoder part (``num_transformer_submodules`` 2, PEFT embeds them itself); with the encoder-only
    prompt PEFT hands the decoder its ids, so the decoder's own ``embed_tokens``. All one table in every released
    T5 — but a checkpoint with separate tables must export what PEFT computes."""
    word = peft_model_for(model, adapters_from_bank(bank)[0][0]).word_embeddings
    decoder = word if bank.num_transformer_submodules == 2 else model.get_decoder().embed_tokens
    return {"embed": word, "decoder_embed": decoder}


ISOLATE_BYTES = 256 * 2**20  # base-model weight files from this size on are exported in a child process


def weight_bytes(base_model) -> int:
    """Bytes of the base model's weight files (what the torch phase will hold)."""
    d = Path(base_model)
    return sum(f.stat().st_size for f in d.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file()) \
        if d.is_dir() else 0


@quietly
def torch_phase(spec: dict, bank: TaskBank, step) -> dict:
    """Load the base model in the export dtype, export its graphs into ``spec["out"]`` and, with ``validate``,
    compute PEFT's reference outputs on the validation inputs (fp32 arithmetic: a half model is cast up in place
    after the export). -> graphs (manifest entries), opset, cases, timings. Frees the model before returning."""
    tmp = Path(spec["out"])
    dtype = spec["dtype"]
    require_export_deps()  # imported first, so the start figure is the libraries' own memory
    timings = {"torch_phase_start_rss_mib": rss_mib()}
    t0 = time.perf_counter()
    step("load base model")
    model, cfg, arch = load_base_model(spec["base_model"], dtype=dtype)  # in the export dtype: one copy
    if dtype != "float32":
        to_half(model, dtype)
    timings["load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    if arch.task_type == "SEQ_2_SEQ_LM":
        step("export encoder and decoder")
        sio = export_seq2seq(model, arch, tmp, opset=spec["opset"], dtype=dtype, **token_embeddings(model, bank))
        real_opset = sio.pop("opset")
        graphs = {"encoder": {"file": "encoder.onnx", "external_data": WEIGHTS_FILE, **sio["encoder"]},
                  "decoder": {"file": "decoder.onnx", "external_data": WEIGHTS_FILE, **sio["decoder"]}}
    else:
        step("export backbone")
        bio = export_backbone(model, arch, tmp / "backbone.onnx", opset=spec["opset"], dtype=dtype)
        real_opset = bio.pop("opset")
        graphs = {"backbone": {"file": "backbone.onnx", "external_data": "backbone.onnx.data", **bio}}
        if spec.get("fast_graph", True):
            graphs.update(fast_graph(model, arch, tmp, dtype, step))
    timings["graph_export_s"] = round(time.perf_counter() - t0, 2)
    cases = None
    if spec["validate"]:
        t0 = time.perf_counter()
        cases = references(model, bank, spec["seed"], step)
        timings["reference_s"] = round(time.perf_counter() - t0, 2)
    del model
    release_freed_memory()
    timings["torch_phase_peak_rss_mib"] = peak_rss_mib()
    return {"graphs": graphs, "opset": int(real_opset), "cases": cases, "timings": timings}


FUSED_FILE = "backbone_fast.onnx"


def fast_graph(model, arch, tmp: Path, dtype: str, step) -> dict:
    """The fused ONNX Runtime backbone (``fusedgraph.py``) beside the traced one, its weights stored once with the
    traced graph's (same tensors, shared by content in ``backbone.onnx.data``). -> ``{"backbone_fast": spec}``, or
    ``{"backbone_fused_skipped": why}`` where the model needs what the fused graph cannot express (then sessions run the
    traced graph, as before)."""
    if dtype != "float32":  # (their int8/int4 copies get one: quantizing starts from fp32)
        return {"backbone_fused_skipped": f"the fused graph is written for fp32 bundles; a {dtype} bundle runs the "
                                         "traced graph, whose norms and softmax stay in fp32"}
    step("export fused backbone")
    try:
        io = write_fused_backbone(model, arch, tmp / FUSED_FILE, dtype)
    except ExportError as e:
        for f in (tmp / FUSED_FILE, tmp / (FUSED_FILE + ".data")):
            f.unlink(missing_ok=True)
        return {"backbone_fused_skipped": str(e)}
    share_weights(tmp, ["backbone.onnx", FUSED_FILE], "backbone.onnx.data")
    return {"backbone_fast": {"file": FUSED_FILE, "external_data": "backbone.onnx.data", "layout": "kv-buffer", **io}}


def _child_main() -> None:
    """``python -m mpt_export.export.torchside``: the torch phase for a parent export. Reads (spec, bank) from stdin and
    writes progress, then the result or the error, as pickle frames to the file descriptor in argv[1] (a pipe from
    the parent that started it — internal data between our two processes, never from a client)."""
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
    rfd, wfd = os.pipe()
    log = tempfile.TemporaryFile()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "mpt_export.export.torchside", str(wfd)], stdin=subprocess.PIPE,
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
                cls = getattr(error_types, name, None)
                if isinstance(cls, type) and issubclass(cls, MptExportError):
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


if __name__ == "__main__":
    _child_main()

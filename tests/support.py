"""What the tests share besides fixtures: the tiny-model case (built in code, never downloaded), the CLI run
in-process (:func:`cli`, through typer's runner: no fresh interpreter per call) or as the installed console script
(:func:`run_cli`, for the end-to-end tier), and a few assertions."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import traceback
from contextlib import chdir
from pathlib import Path

TINY = dict(hidden=32, layers=2, heads=4, max_positions=64)
EXE = Path(sys.executable).with_name("mpt-export")  # the installed console script


class Case:
    """A base model dir, a 3-task source adapter (rank 2), a target adapter (rank 1, own P*), and their bundle.

    The T5 bases carry what real checkpoints have and the default tiny config lacks (see ``LIKE_REAL``): ``t5`` large
    activations, ``flan-t5`` encoder and decoder token tables apart from ``shared``."""

    def __init__(self, root: Path, arch: str, nts: int | None = None):
        """Build the case under ``root`` — or, where ``root`` already holds it (another test worker built it: see
        ``shared``), only name its parts."""
        from mpt_export.tools.demo import SEQ2SEQ_ARCHS

        self.root, self.arch = root, arch
        self.seq2seq = arch in SEQ2SEQ_ARCHS
        self.base, self.source, self.target = root / "base", root / "source", root / "target"
        self.init_copy = root / "gone" / "adapter_model.safetensors"
        self._bundle = root / "bundle" if (root / "bundle.done").exists() else None
        if not (root / "case.done").exists():
            self._build(nts)
            (root / "case.done").touch()

    @classmethod
    def shared(cls, cache: Path, key: str, arch: str, nts: int | None = None) -> "Case":
        """The case ``key`` under ``cache``, built once for every test worker of this run (pytest-xdist gives each
        its own session): the first to ask builds it under a file lock, the others wait and read it. Tests read a
        case or copy it, never change it."""
        from filelock import FileLock

        cache.mkdir(parents=True, exist_ok=True)
        with FileLock(str(cache / f"{key}.lock")):
            case = cls(cache / key, arch, nts)
        case._lock = FileLock(str(cache / f"{key}.lock"))
        return case

    def _build(self, nts: int | None) -> None:
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        from mpt_export.tools.demo import make_base_model, make_source_adapter, make_target_adapter

        root, arch = self.root, self.arch
        task_type = "SEQ_2_SEQ_LM" if self.seq2seq else "CAUSAL_LM"
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        from mpt_export.tools.families import ALL_TINY, make_family_model

        real, sizes = SIZED.get(arch, (arch, {}))
        if arch in ALL_TINY:  # a family's tiny model with its real config's features
            model = make_family_model(self.base, arch, seed=0)
        else:
            model = make_base_model(self.base, arch=real, seed=0, **{**TINY, **sizes})
        if arch in LIKE_REAL:
            LIKE_REAL[arch](model)
            model.save_pretrained(str(self.base))
        self.source = make_source_adapter(model, root / "source", num_tasks=3, num_virtual_tokens=5, num_ranks=2, seed=1,
                                          task_type=task_type, num_transformer_submodules=nts)
        model = auto.from_pretrained(str(self.base))
        self.target = make_target_adapter(model, root / "target", self.source, source_task=2, num_ranks=1, seed=2,
                                          init="ONLY_SOURCE_SHARED", task_type=task_type)
        # The init file named in the target's config is gone, as on a user's machine: reading must not need it
        # (self.init_copy).

    @property
    def adapters(self) -> list[str]:
        return [f"a,b,c={self.source}", f"t={self.target}"]

    @property
    def bundle(self) -> Path:
        if self._bundle is None:
            from contextlib import nullcontext

            with getattr(self, "_lock", None) or nullcontext():
                if not (self.root / "bundle.done").exists():
                    self._export()
                self._bundle = self.root / "bundle"
        return self._bundle

    def _export(self) -> None:
        import json

        from mpt_export import export_bundle

        cfg_file = self.target / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["prompt_tuning_init_state_dict_path"] = str(self.init_copy)  # does not exist
        cfg_file.write_text(json.dumps(cfg))
        export_bundle(self.base, self.adapters, self.root / "bundle", seed=123)
        (self.root / "bundle.done").touch()


def large_activations(model) -> None:
    """Real T5 checkpoints have activations of tens to thousands (fp32 rounding grows with them): scale the tiny
    model's embedding, final norms and feed-forward outputs up, in place."""
    import torch

    with torch.no_grad():
        model.shared.weight.mul_(10.0)
        for stack in (model.encoder, model.decoder):
            stack.final_layer_norm.weight.mul_(10.0)
            for blk in stack.block:
                blk.layer[-1].DenseReluDense.wo.weight.mul_(3.0)


def separate_token_tables(model) -> None:
    """Encoder and decoder token tables whose values differ from ``shared`` (transformers then keeps three tables),
    in place."""
    import torch

    g = torch.Generator().manual_seed(9)
    V, H = model.shared.weight.shape
    with torch.no_grad():
        model.encoder.embed_tokens = torch.nn.Embedding(V, H)
        model.decoder.embed_tokens = torch.nn.Embedding(V, H)
        model.encoder.embed_tokens.weight.copy_(torch.randn(V, H, generator=g))
        model.decoder.embed_tokens.weight.copy_(torch.randn(V, H, generator=g))


# Cases of another width: ONNX Runtime's GroupQueryAttention (the fused graph) needs head sizes that are multiples of
# 16, so the usual tiny cases (head size 8) have no fused graph and "llama-h64" (head size 16) has one.
SIZED = {"llama-h64": ("llama", dict(hidden=64))}

LIKE_REAL = {"t5": large_activations, "flan-t5": separate_token_tables}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps at 80 columns when not on a terminal
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600, env=env)


def peft_refs(case):
    """The case's bundle and, per task, (PEFT model over the base, task index in its adapter)."""
    import mpt_export
    from mpt_export.export.torchside import adapters_from_bank, load_base_model
    from mpt_export.export.reference import peft_model_for

    model, _, _ = load_base_model(case.base)
    b = mpt_export.load_bundle(case.bundle)
    refs = {}
    for ck, names in adapters_from_bank(b.task_bank()):
        pm = peft_model_for(model, ck)
        for i, n in enumerate(names):
            refs[n] = (pm, i)
    return b, refs


def peft_greedy(pm, task_index, ids, steps):
    """argmax of PEFT's forward recomputed on the growing sequence, no cache."""
    import numpy as np
    import torch

    seq = torch.from_numpy(ids.astype(np.int64))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = pm(input_ids=seq, attention_mask=torch.ones_like(seq), task_ids=torch.tensor([task_index]),
                        use_cache=False).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            out.append(int(nxt))
            seq = torch.cat([seq, nxt], dim=1)
    return out


def left_padded(vocab: int, lens: list[int], seed: int = 5):
    """Random token rows of the given lengths, left-padded: (ids, mask), int64 (B, max(lens))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    S = max(lens)
    ids = np.zeros((len(lens), S), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        ids[i, S - n:] = rng.integers(0, vocab, n)
        mask[i, S - n:] = 1
    return ids, mask


class CliResult:
    def __init__(self, returncode: int, stdout: str, stderr: str):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> CliResult:
    """The CLI in this process (typer's runner), as :func:`run_cli` reports it. A Python exception that escapes a
    command (a bug: the console script would print a traceback) is re-raised here, never taken for exit code 1."""
    from typer.testing import CliRunner

    from mpt_export.cli import app

    runner = CliRunner()
    with chdir(cwd or os.getcwd()):
        res = runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200", **(env or {})}, catch_exceptions=True)
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise AssertionError(f"`mpt-export {shlex.join(map(str, args))}` raised "
                             + "".join(traceback.format_exception(res.exception)))
    return CliResult(res.exit_code, res.stdout, res.stderr)


def assert_clean_failure(res, *needles):
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    err = res.stderr + res.stdout
    assert "Traceback" not in err and "locals" not in err.lower()
    assert "error:" in err
    for n in needles:
        assert n in " ".join(err.split()), (n, err)


def no_output_left(out):
    return not out.exists() and not list(out.parent.glob(f".{out.name}.mpt-export-tmp-*"))


def wide_adapter(tmp_path):
    """A 2-task adapter for a base model of another width (hidden 48) than the cases' (32)."""
    from mpt_export.tools.demo import make_base_model, make_source_adapter

    m = make_base_model(tmp_path / "wide_base", arch="llama", hidden=48, layers=1, heads=4, tokenizer=False)
    return make_source_adapter(m, tmp_path / "wide", num_tasks=2, num_virtual_tokens=3)


def edit_manifest(b: Path, fn, redigest: bool):
    """Edit a bundle's manifest.json in place with ``fn``; ``redigest``: recompute its own sha256 as an attacker
    would."""
    from mpt_export.bundle.manifest import DIGEST_KEY, manifest_digest

    m = json.loads((b / "manifest.json").read_text())
    fn(m)
    if redigest:
        m[DIGEST_KEY] = manifest_digest(m)
    (b / "manifest.json").write_text(json.dumps(m, indent=2))


def poison_token(b: Path, token: int) -> None:
    """Make a real bundle produce NaN for every row whose input holds ``token``: its row of the embedding table set
    to NaN in every graph that reads it (shared weights file or the graph itself), the checksums made to match
    again (what a damaged or hostile bundle looks like once re-hashed)."""
    import numpy as np
    import onnx

    from mpt_export.bundle.manifest import write_manifest

    done = set()
    for f in sorted(b.glob("*.onnx")):
        g = onnx.load(str(f), load_external_data=False)
        for t in g.graph.initializer:
            if "embed" not in t.name or len(t.dims) != 2 or t.data_type != onnx.TensorProto.FLOAT:
                continue
            row = int(t.dims[1]) * 4
            info = {e.key: e.value for e in t.external_data}
            if info:
                key = (info["location"], int(info["offset"]))
                if key not in done:
                    done.add(key)
                    with open(b / info["location"], "r+b") as fh:
                        fh.seek(key[1] + token * row)
                        fh.write(np.full(row // 4, np.nan, np.float32).tobytes())
            else:
                raw = bytearray(t.raw_data)
                raw[token * row:(token + 1) * row] = np.full(row // 4, np.nan, np.float32).tobytes()
                t.raw_data = bytes(raw)
                onnx.save(g, str(f))
    write_manifest(b, json.loads((b / "manifest.json").read_text()))


def planted(model, arch: str, factor: float):
    """A copy of ``model`` with one mid-depth value projection scaled by ``factor`` (a planted error)."""
    import copy

    from mpt_export.tools.bench_export import mid_value_projection

    import torch

    bad = copy.deepcopy(model)
    with torch.no_grad():
        mid_value_projection(bad).mul_(factor)
    return bad


def settings_of(job: dict):
    """A job's generation settings (every key but ``task`` and ``ids``) as the one object both paths take."""
    from mpt_export.runtime.sampling import SamplingParams

    return SamplingParams(**{k: v for k, v in job.items() if k not in ("task", "ids")})


def solo(session, job: dict) -> list[int]:
    """The tokens ``Session.generate`` gives one scheduler job (``task``, ``ids`` and its settings) alone."""
    import numpy as np

    r = session.generate_detailed(np.array([job["ids"]]), [job["task"]], sampling=settings_of(job))
    return r.ids[0, : r.lengths[0]].tolist()


def serve_all(scheduler, jobs: list[dict]):
    """Submit every job to the (started) scheduler at once and wait until each has ended. -> their Requests."""
    import threading

    from mpt_export.scheduler.request import Request

    done = threading.Semaphore(0)
    reqs = [Request(task=j["task"], ids=j["ids"], sampling=settings_of(j),
                    on_event=lambda k, d: done.release() if k in ("done", "error") else None) for j in jobs]
    for r in reqs:
        scheduler.submit(r)
    for _ in reqs:
        assert done.acquire(timeout=120)
    return reqs


def run_root(tmp_path_factory) -> "os.PathLike":
    """A folder every test worker of this run shares (pytest-xdist gives each worker a base folder of its own
    under one parent); the base folder itself without xdist."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, key: str, build) -> "os.PathLike":
    """``build(folder)`` run once for every test worker of this run (under a file lock; the others wait, then read
    the folder); -> the folder."""
    from filelock import FileLock

    root = run_root(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    folder, done = root / key, root / f"{key}.done"
    with FileLock(str(root / f"{key}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            build(folder)
            done.touch()
    return folder

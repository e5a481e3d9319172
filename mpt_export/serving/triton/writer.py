"""``mpt-export triton``: a bundle as a Triton Inference Server model repository.

```
OUT/
  .mpt-export                      what this tool wrote (so --force may replace it, and nothing else)
  composer/  config.pbtxt  1/model.onnx                         onnxruntime_onnx (always: one small matmul)
  backbone/  config.pbtxt  1/model.onnx/{model.onnx, <weights>} onnxruntime_onnx, or 1/model.plan (tensorrt_plan)
  generate/  config.pbtxt  1/model.py  1/bundle/...             python backend, decoupled: the generation engine
```
(T5 bundles: ``encoder`` and ``decoder`` in place of ``backbone``, each with the shared weights file in its own
model directory.) Each bundle file is **copied once** (a copy-on-write clone where the filesystem has them), and
the repository's other places for it are hard links to that copy: one copy of the weights in the repository, and
the bundle's own files are never linked (ONNX's loader refuses a weights file with several links).

Graph models: ``max_batch_size`` > 0 with the batch axis left out of ``dims``, names and dtypes from the manifest
(checked against the graphs), ``dynamic_batching`` with a bounded queue, ``instance_group``. Triton's dynamic batcher
only merges requests of equal shapes, so rows with different past lengths — every decode step of a mixed-task batch
— never merge there: batching across tasks happens in ``generate``, which runs the same continuous-batching engine as
``mpt-export serve`` (see :mod:`mpt_export.serving.triton.generate`). Its graph calls go, by default, to ONNX Runtime
inside the Python backend's process (``graph_calls: onnxruntime``): the KV cache then stays in place between steps.
With BLS (``graph_calls: bls``, the default for ``--backend tensorrt``, whose plans run in Triton's TensorRT backend)
every step sends the KV cache to the graph model and back through Triton's shared memory.

Before the repository is moved into place it is checked the way Triton would check it
(:func:`~mpt_export.serving.triton.check.check_repository`).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ...errors import InputError
from .check import TritonRepositoryError, check_repository
from ...bundle.reader import load_bundle
from ...runtime.trt.sidecar import bundle_fingerprint, EngineMismatchError, read_sidecar
from ...storage.atomic import replace_dir
from ...storage.ownership import seal_workdir
from .generate import refuse_bf16

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "bool": "TYPE_BOOL", "string": "TYPE_STRING"}
KIND = "triton-repository"
GENERATE = "generate"

# The generation model's tensors (names as Triton's LLM backends use them: text_input / text_output, max_tokens,
# stream, sampling settings), plus the task.
GEN_INPUTS = [  # name, type, dims, optional
    ("text_input", "TYPE_STRING", [1], False),
    ("task", "TYPE_STRING", [1], False),
    ("max_tokens", "TYPE_INT32", [1], True),
    ("temperature", "TYPE_FP32", [1], True),
    ("top_k", "TYPE_INT32", [1], True),
    ("top_p", "TYPE_FP32", [1], True),
    ("seed", "TYPE_INT64", [1], True),
    ("stop", "TYPE_STRING", [-1], True),
    ("stream", "TYPE_BOOL", [1], True),
]
GEN_OUTPUTS = [("text_output", "TYPE_STRING", [1]), ("output_ids", "TYPE_INT64", [-1]),
               ("finish_reason", "TYPE_STRING", [1])]


# -- config text ------------------------------------------------------------------------------------------------------
def _q(s: str) -> str:
    return json.dumps(str(s))


def _tensors(kind: str, items) -> list[str]:
    out = [f"{kind} ["]
    for i, (name, dtype, dims, optional) in enumerate(items):
        opt = " optional: true" if optional else ""
        sep = "," if i < len(items) - 1 else ""
        out.append(f"  {{ name: {_q(name)} data_type: {dtype} dims: [ {', '.join(map(str, dims))} ]{opt} }}{sep}")
    out.append("]")
    return out


def _graph_tensors(specs, batched: bool) -> list[tuple]:
    items = []
    for s in specs:
        dims = [d if isinstance(d, int) else -1 for d in s.shape]
        items.append((s.name, TRITON_DTYPES[s.dtype], dims[1:] if batched else dims, False))
    return items


def graph_config(name: str, spec, platform: str, max_batch: int, instances: int, kind: str, max_queue: int,
                 profiles: int = 0) -> str:
    """config.pbtxt of one graph model. ``profiles``: a TensorRT plan's optimization profile count (all offered to
    every instance; Triton picks the one whose ranges hold a request's shapes)."""
    backend = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt"}[platform]
    lines = [f"name: {_q(name)}", f"platform: {_q(platform)}", f"backend: {_q(backend)}",
             f"max_batch_size: {max_batch}"]
    lines += _tensors("input", _graph_tensors(spec.inputs, True))
    lines += _tensors("output", _graph_tensors(spec.outputs, True))
    lines += ["dynamic_batching {", "  max_queue_delay_microseconds: 0",
              f"  default_queue_policy {{ max_queue_size: {max_queue} }}", "}"]
    group = f"  {{ count: {instances} kind: {'KIND_GPU' if kind == 'gpu' else 'KIND_CPU'}"
    if profiles:
        group += f" profile: [ {', '.join(_q(str(i)) for i in range(profiles))} ]"
    lines += ["instance_group [", group + " }", "]"]
    if platform == "tensorrt_plan" and profiles > 1:
        # Triton's TensorRT backend gives each instance one execution context per profile, each sized (STATIC, its
        # default) for the largest profile; ON_PROFILE_CHANGE allocates a context's memory for the profile it runs
        # (tensorrt_backend: execution_context_allocation_strategy)
        lines.append('parameters { key: "execution_context_allocation_strategy" '
                     'value { string_value: "ON_PROFILE_CHANGE" } }')
    return "\n".join(lines) + "\n"


def start_command(out: Path, sidecar: dict | None, graph_calls: str, kv_bytes: int | None) -> list[str]:
    """``tritonserver`` with what this repository needs: version-compatible plans are loaded only with the TensorRT
    backend's ``version-compatible=true``; BLS calls move every decode step's KV through Python backend's shared
    memory (/dev/shm), whose first region should hold one step's KV in and out."""
    cmd = ["tritonserver", f"--model-repository={Path(out).resolve()}"]
    if sidecar and sidecar.get("version_compatible"):
        cmd.append("--backend-config=tensorrt,version-compatible=true")
    if graph_calls == "bls" and kv_bytes:
        step = 2 * kv_bytes  # past in, present out
        cmd += [f"--backend-config=python,shm-default-byte-size={step}",
                f"--backend-config=python,shm-growth-byte-size={max(step // 4, 1 << 20)}"]
    return cmd


def kv_bytes(info, max_batch: int, limits: dict | None) -> int:
    """Bytes of the KV cache one decode step carries at ``max_batch`` rows and the longest sequence the engines (or
    the model's positions) allow (``info``: the bundle's typed manifest)."""
    bm = info.base_model
    longest = bm.max_positions
    if limits and limits.get("max_input") and limits.get("max_new_tokens"):
        prompt = info.longest_prompt // info.num_transformer_submodules
        longest = min(longest, prompt + int(limits["max_input"]) + int(limits["max_new_tokens"]))
    item = {"float16": 2, "bfloat16": 2}.get(info.dtype, 4)
    return 2 * bm.num_layers * max_batch * bm.num_kv_heads * longest * bm.head_dim * item


def generate_config(name: str, params: dict) -> str:
    lines = [f"name: {_q(name)}", 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }"]
    lines += _tensors("input", GEN_INPUTS)
    lines += _tensors("output", [(n, t, d, False) for n, t, d in GEN_OUTPUTS])
    # one instance: its engine is where rows of every task merge into one batch (two instances would split them)
    lines += ["instance_group [ { count: 1 kind: KIND_CPU } ]"]
    for k, v in params.items():
        lines.append(f"parameters {{ key: {_q(k)} value {{ string_value: {_q(v)} }} }}")
    return "\n".join(lines) + "\n"


# -- writing ------------------------------------------------------------------------------------------------------------
def _clone_or_copy(src: Path, dst: Path) -> str:
    """``dst`` as a copy of ``src``: a copy-on-write clone where the filesystem has them (btrfs, XFS: no extra disk),
    else a plain copy. -> "cloned" or "copied"."""
    import fcntl

    FICLONE = 0x40049409
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        try:
            fcntl.ioctl(fo.fileno(), FICLONE, fi.fileno())
            return "cloned"
        except OSError:
            shutil.copyfileobj(fi, fo, 16 << 20)
            return "copied"


def _place(src: Path, dst: Path, how: dict, placed: dict) -> None:
    """Put bundle file ``src`` at ``dst``. The bundle's own files are never hard-linked: a weights file with several
    links is refused by ONNX's loader (it reads them as a possible hard-link attack), which would break every
    ONNX-reading command on the user's bundle. So each bundle file is copied (cloned) once, and later places in the
    repository hard-link to that copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    key = os.fspath(src)
    if key in placed:
        try:
            os.link(placed[key], dst)
            how["linked"] += 1
            return
        except OSError:
            pass
    kind = _clone_or_copy(src, dst)
    how[kind] += 1
    how["bytes"] += dst.stat().st_size if kind == "copied" else 0
    placed.setdefault(key, dst)


def check_engines(bundle, engines: Path | None, max_batch: int) -> dict:
    """The engines folder for ``--backend tensorrt``: written by ``mpt-export build`` from this very bundle, one plan
    per graph, profiles that take ``max_batch`` rows. -> its sidecar. (TensorRT version and GPU are checked where
    the plans run: by Triton, when it loads them.)"""
    if engines is None:
        raise InputError("--backend tensorrt needs the engines built from this bundle: run `mpt-export build "
                         f"{bundle.path} --out engines/{bundle.path.name}` on the GPU Triton will use, then pass "
                         "--engines engines/<name>")
    try:
        sidecar = read_sidecar(engines)
    except EngineMismatchError as e:
        raise TritonRepositoryError(f"--engines {engines}: {e}") from None
    fp = bundle_fingerprint(bundle)
    if sidecar.get("bundle", {}).get("digest") != fp["digest"]:
        raise TritonRepositoryError(
            f"the engines in {engines} were built from another bundle ({sidecar.get('bundle', {}).get('bundle_path')}"
            f"), not {bundle.path}; rebuild them: mpt-export build {bundle.path} --out {engines}")
    for graph in fp["graphs"]:
        info = sidecar.get("engines", {}).get(graph)
        if not info or not (Path(engines) / info["file"]).is_file():
            raise TritonRepositoryError(f"{engines} has no engine for the {graph} graph; rebuild them: "
                                        f"mpt-export build {bundle.path} --out {engines}")
    built = int(sidecar.get("limits", {}).get("max_batch", max_batch))
    if built < max_batch:
        raise TritonRepositoryError(f"the engines in {engines} take at most {built} rows (their profiles), "
                                    f"--max-batch is {max_batch}; pass --max-batch {built} or rebuild with "
                                    f"--max-batch {max_batch}")
    return sidecar


def _check_tensorrt_reads(info, bundle_path) -> None:
    """A quantized bundle (MatMulNBits, or dynamic int8's MatMulInteger) is for ONNX Runtime: refused for Triton's
    TensorRT backend before anything else is checked."""
    q = info.quantization
    if q:
        raise TritonRepositoryError(
            f"{bundle_path} is a {q.get('scheme') or q.get('weights')} bundle ({q.get('what', 'quantized for ONNX Runtime')}"
            "): TensorRT cannot read its graphs, so Triton's TensorRT backend cannot serve it; use --backend onnxruntime "
            "(CPU or GPU instances), or build engines from the fp32/fp16 bundle it was quantized from")


def _check_options(backend, kind, max_batch, instances, max_queue, prefix, graph_calls) -> str:
    """The command's own options, before the bundle is read. -> the graph calls to use."""
    if backend not in ("onnxruntime", "tensorrt"):
        raise InputError(f"--backend must be onnxruntime or tensorrt, got {backend!r}")
    if kind not in ("cpu", "gpu"):
        raise InputError(f"--kind must be cpu or gpu, got {kind!r}")
    if backend == "tensorrt" and kind != "gpu":
        raise InputError("--backend tensorrt runs TensorRT plans, which need a GPU instance: pass --kind gpu")
    if not 1 <= max_batch <= 4096 or instances < 1 or max_queue < 1:
        raise InputError("--max-batch (1-4096), --instances and --max-queue must be >= 1")
    if prefix and not all(c.isalnum() or c in "_-." for c in prefix):
        raise InputError(f"--prefix may hold letters, digits, '_', '-' and '.', got {prefix!r}")
    graph_calls = graph_calls or ("bls" if backend == "tensorrt" else "onnxruntime")
    if graph_calls not in ("onnxruntime", "bls"):
        raise InputError(f"--graph-calls must be onnxruntime or bls, got {graph_calls!r}")
    return graph_calls


def write_repository(bundle_path, out, backend: str = "onnxruntime", engines=None, max_batch: int = 8,
                     instances: int = 1, kind: str = "cpu", max_queue: int = 256, prefix: str = "",
                     graph_calls: str | None = None, force: bool = False) -> dict:
    """Write the model repository (atomically: ``out`` holds all of it or none of it). -> what was written."""
    graph_calls = _check_options(backend, kind, max_batch, instances, max_queue, prefix, graph_calls)
    b = load_bundle(bundle_path)
    try:
        refuse_bf16(b.info, bundle_path)
        if backend == "tensorrt":
            _check_tensorrt_reads(b.info, bundle_path)
        engines = Path(engines) if engines else None
        sidecar = check_engines(b, engines, max_batch) if backend == "tensorrt" else None
        graphs = b.info.graphs
        for g, spec in graphs.items():
            for t in spec.inputs + spec.outputs:
                if isinstance(t.shape[0], int) or t.dtype not in TRITON_DTYPES:
                    raise TritonRepositoryError(f"{g}'s {t.name} ({t.dtype} {list(t.shape)}) has no batch axis "
                                                "first or a type Triton lacks; re-export the bundle with this version")
        names = {g: f"{prefix}{g}" for g in graphs}
        gen_name = f"{prefix}{GENERATE}"
        inputs = [("bundle", b.path)] + ([("engines", engines)] if engines else [])
        how = {"linked": 0, "copied": 0, "cloned": 0, "bytes": 0}
        placed: dict = {}
        with replace_dir(out, KIND, force, inputs) as tmp:
            (tmp / ".mpt-export").write_text(json.dumps({"kind": KIND, "written_by": "mpt-export",
                                                         "contents": sorted(names.values()) + [gen_name]}) + "\n")
            for g, spec in graphs.items():
                d = tmp / names[g]
                plan = sidecar and g in sidecar["engines"]
                if plan:
                    _place(Path(engines) / sidecar["engines"][g]["file"], d / "1" / "model.plan", how, placed)
                    (d / "1" / "engine.json").write_text(json.dumps(sidecar, indent=1) + "\n")  # what it was built from
                    nprof = len(sidecar.get("profiles", {}).get(g, [])) or 1
                    cfg = graph_config(names[g], spec, "tensorrt_plan", max_batch, instances, "gpu", max_queue, nprof)
                elif spec.external_data:  # several files: Triton wants them in a directory named model.onnx
                    _place(b.file(spec.file), d / "1" / "model.onnx" / "model.onnx", how, placed)
                    _place(b.file(spec.external_data), d / "1" / "model.onnx" / spec.external_data, how, placed)
                    cfg = graph_config(names[g], spec, "onnxruntime_onnx", max_batch, instances, kind, max_queue)
                else:
                    _place(b.file(spec.file), d / "1" / "model.onnx", how, placed)
                    # the composer runs once per task (cached): CPU is where it belongs even on a GPU server
                    cfg = graph_config(names[g], spec, "onnxruntime_onnx", max_batch, instances,
                                       kind if g != "composer" else "cpu", max_queue)
                (d / "config.pbtxt").write_text(cfg)
            gdir = tmp / gen_name
            for rel in b.info.files:
                _place(b.file(rel), gdir / "1" / "bundle" / rel, how, placed)
            _place(b.root / "manifest.json", gdir / "1" / "bundle" / "manifest.json", how, placed)
            shutil.copyfile(Path(__file__).with_name("model.py"), gdir / "1" / "model.py")
            params = {"graph_calls": graph_calls, "max_batch": str(max_batch), "max_queue": str(max_queue),
                      "provider": "cuda" if kind == "gpu" and graph_calls == "onnxruntime" else "cpu",
                      "graph_models": json.dumps(names),
                      # what the graph models take (TensorRT profiles' maxima), checked when a request is admitted
                      "engine_limits": json.dumps(sidecar.get("limits", {}) if sidecar else {})}
            (gdir / "config.pbtxt").write_text(generate_config(gen_name, params))
            problems = check_repository(tmp, b, {names[g]: g for g in graphs})
            if problems:
                raise TritonRepositoryError("the repository would not load in Triton: " + "; ".join(problems[:6]))
            seal_workdir(tmp)
        kv = kv_bytes(b.info, max_batch, sidecar.get("limits") if sidecar else None)
        return {"out": str(out), "models": [*names.values(), gen_name], "graph_calls": graph_calls,
                "backend": backend, "kv_step_bytes": kv if graph_calls == "bls" else None,
                "start": start_command(out, sidecar, graph_calls, kv), **how}
    finally:
        b.close()

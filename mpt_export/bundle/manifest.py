"""The bundle's manifest: its constants, digests (of every file and of itself) and the checks of every field the
runtime trusts. Reading a bundle is in ``reader.py``; the format is documented in docs/reference/bundle-format.md."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path, PurePosixPath

from ..errors import BundleError
from ..storage.ownership import STAGING_MARKER
from .taskbank import positions_needed, TASK_NAME_RE

MANIFEST = "manifest.json"
FORMAT = "mpt-export/bundle/3"  # what this version writes: the task list lives in the task files, not here
READABLE = ("mpt-export/bundle/2", FORMAT)  # format 2: the task list in the manifest, one task file
TASK_FILES_DIR = "tasks"  # segments written by task edits: tasks/000001.safetensors, ...
DIGEST_KEY = "manifest_sha256"
REQUIRED_FILES = {"CAUSAL_LM": ("backbone.onnx", "backbone.onnx.data", "composer.onnx", "tasks.safetensors"),
            "SEQ_2_SEQ_LM": ("encoder.onnx", "decoder.onnx", "weights.onnx.data", "composer.onnx", "tasks.safetensors")}
GRAPHS = {"CAUSAL_LM": ("backbone", "composer"), "SEQ_2_SEQ_LM": ("encoder", "decoder", "composer")}
DTYPES = ("float32", "float16", "bfloat16")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20
REDO = "copy the bundle again or re-export it"


# Every top-level field: (default, or REQUIRED; what it means). Writers write these keys (bundle format 3); an old
# bundle without an optional field reads as its default.
REQUIRED = object()
FIELDS: dict[str, tuple[object, str]] = {
    "format": (REQUIRED, "the bundle format, mpt-export/bundle/3 (2 is read too)"),
    "created_by": (None, "tool versions that wrote the bundle"),
    "created_at": (None, "when it was written (UTC, ISO 8601)"),
    "task_type": (REQUIRED, "CAUSAL_LM or SEQ_2_SEQ_LM"),
    "dtype": ("float32", "the graphs' float type: float32, float16 or bfloat16"),
    "opset": (18, "the ONNX opset of the traced graphs"),
    "base_model": (REQUIRED, "the base model's identity and the sizes the runtime allocates by"),
    "num_transformer_submodules": (1, "prompt blocks per task: 2 where a seq2seq prompt also feeds the decoder"),
    "graphs": (REQUIRED, "the traced graphs (standard ONNX): name -> file, weights file, inputs, outputs"),
    "fast_graphs": (None, "ONNX Runtime's fused backbone beside the traced one (older bundles: none)"),
    "fast_graph_skipped": (None, "why the bundle has no fused graph"),
    "scoring_graphs": (None, "the graph that scores every prompt position (echo); older bundles: none"),
    "tasks": (None, "format 2 only: the task list, in tasks.safetensors' order, with sizes and content digests "
                    "(format 3 keeps it in the task files' own index)"),
    "task_files": (("tasks.safetensors",), "the task bank's files, read in order: tasks.safetensors (what export or "
                                           "the last compaction wrote), then one segment per later task edit"),
    "adapters": ((), "the PEFT adapter directories the tasks came from"),
    "tokenizer": (None, "the tokenizer files copied from the base model"),
    "validation": (None, "the export's comparison with PEFT: per-output abs/rel differences, tolerances"),
    "quantization": (None, "how the graphs' weights were quantized (and the agreement measured)"),
    "timings": (None, "seconds the export's steps took"),
    "files": (REQUIRED, "the sha256 of every file of the bundle"),
    DIGEST_KEY: (REQUIRED, "the sha256 of the manifest's canonical JSON, this field left out"),
}


def default(m: dict, key: str):
    """A top-level field of manifest ``m``, or its declared default."""
    return m.get(key, FIELDS[key][0])


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (bounded memory for multi-GB weights)."""
    with open(path, "rb") as f:
        return sha256_stream(f.fileno())


def sha256_stream(fd: int) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, CHUNK)
        if not chunk:
            return h.hexdigest()
        h.update(chunk)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no whitespace), its own digest field left out."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_digests(root: Path, known: dict[str, str] | None = None) -> dict[str, str]:
    """sha256 of every file under ``root`` except the manifest and staging markers, keyed by POSIX relative path.
    ``known``: digests already established for some files (hard links of a verified bundle's files)."""
    known = known or {}
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_symlink() or not p.is_file() or p.name in (MANIFEST, STAGING_MARKER, MANIFEST + ".tmp"):
            continue
        rel = p.relative_to(root).as_posix()
        out[rel] = known.get(rel) or sha256_file(p)
    return out


def write_manifest(root: Path, manifest: dict, known: dict[str, str] | None = None) -> dict:
    """Write ``manifest`` (with the sha256 of every file and its own digest) into a directory being staged."""
    manifest = {**manifest, "files": file_digests(root, known)}
    manifest.pop(DIGEST_KEY, None)
    manifest[DIGEST_KEY] = manifest_digest(manifest)
    tmp = Path(root) / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, Path(root) / MANIFEST)
    return manifest


# -- manifest checks -----------------------------------------------------------------------------------------------

def safe_relpath(rel) -> bool:
    """A plain relative POSIX path inside the bundle: no absolute path, ``..``, ``.``, empty part or backslash."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and PurePosixPath(rel).as_posix() == rel


def _bad(field: str, found, expected: str) -> BundleError:
    shown = json.dumps(found)[:80] if not isinstance(found, str) else repr(found[:80])
    return BundleError(f"{MANIFEST}: {field} is {shown}, expected {expected}; the manifest was edited or damaged — "
                       f"{REDO}")


def _posint(d: dict, key: str, where: str, zero: bool = False) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero else 1):
        raise _bad(f"{where}.{key}" if where else key, v, "a non-negative integer" if zero else "a positive integer")
    return v


def check_manifest(m) -> None:
    """Every field the runtime trusts: present, of the right type, consistent with the others and the graph specs."""
    if not isinstance(m, dict):
        raise _bad("the top level", type(m).__name__, "a JSON object")
    task_type = m.get("task_type")
    if task_type not in REQUIRED_FILES:
        raise _bad("task_type", task_type, f"one of {', '.join(REQUIRED_FILES)}")
    if default(m, "dtype") not in DTYPES:
        raise _bad("dtype", m.get("dtype"), f"one of {', '.join(DTYPES)}")
    files = _check_files(m, task_type)
    bm = _check_base_model(m)
    graphs = _check_graph_specs(m, files, task_type)
    _check_graph_fields(m, bm, graphs, task_type)
    _check_token_ids(bm)
    _check_reports(m)
    _check_task_files(m, files)
    if m.get("format") != FORMAT or m.get("tasks") is not None:  # format 2: the task list is here
        tasks = _check_tasks(m)
        check_positions(default(m, "num_transformer_submodules"), bm["max_positions"], tasks, task_type)
    elif default(m, "num_transformer_submodules") not in (1, 2):
        raise _bad("num_transformer_submodules", m.get("num_transformer_submodules"), "1 or 2")


def _check_task_files(m: dict, files: dict) -> None:
    """``task_files``: a non-empty list of distinct files of the bundle, tasks.safetensors first, the others in
    tasks/ (format 2 bundles have only tasks.safetensors)."""
    tf = default(m, "task_files")
    if not isinstance(tf, (list, tuple)) or not tf or tf[0] != "tasks.safetensors" or len(set(tf)) != len(tf) \
            or not all(isinstance(f, str) and f in files for f in tf) \
            or not all(f.startswith(TASK_FILES_DIR + "/") for f in tf[1:]):
        raise _bad("task_files", tf, "a list of the bundle's task files: tasks.safetensors, then segments in tasks/")
    if m.get("format") != FORMAT and len(tf) != 1:
        raise _bad("task_files", tf, "only tasks.safetensors in a format 2 bundle")


def _check_files(m: dict, task_type: str) -> dict:
    """``files``: plain relative paths inside the bundle, each with a sha256; every file the task type needs."""
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad("files", files, "an object mapping each file to its sha256")
    for rel, digest in files.items():
        if not safe_relpath(rel) or rel == MANIFEST:
            raise BundleError(f"{MANIFEST} lists the file {rel!r}; every bundle path must be relative and stay inside "
                              f"the bundle (no '..', no absolute path) — the manifest was edited; {REDO}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise _bad(f"files[{rel!r}]", digest, "a sha256 hex digest")
    for req in REQUIRED_FILES[task_type]:
        if req not in files:
            raise BundleError(f"{MANIFEST} does not list {req}; the bundle is incomplete — {REDO}")
    return files


def _check_base_model(m: dict) -> dict:
    """``base_model``: an object with the positive sizes the runtime allocates by."""
    bm = m.get("base_model")
    if not isinstance(bm, dict):
        raise _bad("base_model", bm, "an object")
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
                "max_positions"):
        _posint(bm, key, "base_model")
    return bm


def _check_graph_specs(m: dict, files: dict, task_type: str) -> dict:
    """``graphs``: the task type's graphs, each a file of the bundle with well-formed input and output specs."""
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or set(graphs) != set(GRAPHS[task_type]):
        raise _bad("graphs", sorted(graphs) if isinstance(graphs, dict) else graphs,
                   f"the graphs {', '.join(GRAPHS[task_type])}")
    for g, spec in graphs.items():
        _check_graph_spec(f"graphs.{g}", spec, files)
    for key in ("fast_graphs", "scoring_graphs"):  # ONNX Runtime's graphs beside the traced ones (older bundles: none)
        extra = m.get(key)
        if extra is None:
            continue
        if not isinstance(extra, dict) or not set(extra) <= {"backbone"}:
            raise _bad(key, extra, "{backbone: graph} (causal bundles only)")
        for g, spec in extra.items():
            _check_graph_spec(f"{key}.{g}", spec, files)
    return graphs


def _check_graph_spec(where: str, spec, files: dict) -> None:
    if not isinstance(spec, dict) or spec.get("file") not in files:
        raise _bad(f"{where}.file", spec.get("file") if isinstance(spec, dict) else spec, "a file of the bundle")
    if spec.get("external_data") is not None and spec["external_data"] not in files:
        raise _bad(f"{where}.external_data", spec["external_data"], "a file of the bundle")
    for side in ("inputs", "outputs"):
        io = spec.get(side)
        if not isinstance(io, list) or not all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("dtype"), str)
                and isinstance(x.get("shape"), list) and all(
                    isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                    for d in x["shape"]) for x in io):
            raise _bad(f"{where}.{side}", io, "a list of {name, dtype, shape: [int | axis name]}")


def _check_token_ids(bm: dict) -> None:
    """The special token ids: null, or ids (or lists of ids) below the vocabulary size."""
    for key in ("eos_token_id", "bos_token_id", "decoder_start_token_id", "pad_token_id"):
        v = bm.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < bm["vocab_size"]
                                     for i in ids):
            raise _bad(f"base_model.{key}", v, f"a token id below the vocabulary size {bm['vocab_size']} (or null)")


def _check_reports(m: dict) -> None:
    """``validation``, ``quantization`` and ``tokenizer``: objects or null; the recorded tolerances finite."""
    for key in ("validation", "quantization", "tokenizer"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise _bad(key, m[key], "an object or null")
    for key in ("atol", "rtol"):
        v = (m.get("validation") or {}).get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
            raise _bad(f"validation.{key}", v, "a finite number >= 0")


def _check_tasks(m: dict) -> list:
    """``tasks``: a non-empty list of uniquely named tasks with their sizes (and optional source, digest)."""
    tasks = m.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _bad("tasks", tasks, "a non-empty list")
    seen = set()
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not TASK_NAME_RE.match(t["name"]):
            raise _bad(f"tasks[{i}].name", t.get("name") if isinstance(t, dict) else t,
                       "a task name (letters, digits, _ . -; starting with a letter or digit)")
        if t["name"] in seen:
            raise _bad(f"tasks[{i}].name", t["name"], "a name used once")
        seen.add(t["name"])
        for key in ("prompt_len", "rank"):
            _posint(t, key, f"tasks[{i}]")
        _posint(t, "shared_prompt", f"tasks[{i}]", zero=True)
        for key in ("bytes", "index_in_source"):  # optional
            if key in t:
                _posint(t, key, f"tasks[{i}]", zero=True)
        for key in ("source", "digest"):
            if key in t and not isinstance(t[key], str):
                raise _bad(f"tasks[{i}].{key}", t[key], "a string")
    return tasks


def check_positions(nts, P: int, tasks, task_type: str) -> None:
    """``num_transformer_submodules`` 1 or 2, and every task (its ``prompt_len``) leaves room for one input token
    and one new token in the model's ``P`` positions."""
    if nts not in (1, 2):
        raise _bad("num_transformer_submodules", nts, "1 or 2")
    for t in tasks:
        T = t["prompt_len"]
        need = positions_needed(T, nts, task_type)
        if need > P:
            raise _bad("base_model.max_positions", P, f"at least {need} for task {t['name']!r} ({T} virtual tokens)")


def _spec(graph: dict, side: str, name: str) -> dict | None:
    return next((x for x in graph[side] if x["name"] == name), None)


def _check_graph_fields(m: dict, bm: dict, graphs: dict, task_type: str) -> None:
    """The base-model numbers the runtime uses must be those of the graph I/O specs."""
    dtype = default(m, "dtype")
    H, L, V = bm["hidden_size"], bm["num_layers"], bm["vocab_size"]
    model_graphs = ("backbone",) if task_type == "CAUSAL_LM" else ("encoder", "decoder")
    for g in model_graphs:
        spec = graphs[g]
        pe = _spec(spec, "inputs", "prompt_embeds") or _spec(spec, "inputs", "decoder_prompt_embeds")
        if pe is None or len(pe["shape"]) != 3 or pe["shape"][-1] != H:
            raise _bad(f"base_model.hidden_size ({g} graph)", H,
                       f"the width of the graph's prompt input ({pe and pe.get('shape')})")
        if pe.get("dtype") != dtype:
            raise _bad("dtype", dtype, f"the {g} graph's prompt dtype {pe.get('dtype')!r}")
    last = graphs["backbone" if task_type == "CAUSAL_LM" else "decoder"]
    logits = _spec(last, "outputs", "logits")
    if logits is None or len(logits["shape"]) != 2 or logits["shape"][-1] != V:
        raise _bad("base_model.vocab_size", V, f"the graph's logits width ({logits and logits['shape']})")
    past = [x for x in last["inputs"] if x["name"].startswith("past_key_values.")]
    if len(past) != 2 * L:  # before building names from L: a crafted huge num_layers must cost nothing
        raise _bad("base_model.num_layers", L, f"half the graph's {len(past)} past key/value inputs")
    want = {f"past_key_values.{i}.{kind}" for i in range(L) for kind in ("key", "value")}
    have = {x["name"] for x in past}
    if have != want:
        detail = "; ".join(x for x in (f"missing {', '.join(sorted(want - have)[:3])}" if want - have else "",
                                        f"unexpected {', '.join(sorted(have - want)[:3])}" if have - want else "") if x)
        raise _bad("base_model.num_layers", L, f"a past key and value input per layer in the graph ({detail})")
    for x in past:
        if len(x["shape"]) != 4 or x["shape"][1] != bm["num_kv_heads"] or x["shape"][3] != bm["head_dim"]:
            raise _bad(f"graph input {x['name']} shape", x["shape"],
                       f"[batch, {bm['num_kv_heads']}, past_len, {bm['head_dim']}] (base_model kv heads, head dim)")

"""The bundle: a directory users copy to a device.

    manifest.json          format, tool versions, base-model identity, graph I/O, tasks, sha256 of every file,
                           the validation report, and the sha256 of the manifest itself
    backbone.onnx(.data)   the frozen base model, weights stored once
    composer.onnx          shared_prompt ⊙ (task_cols @ task_rows)
    tasks.safetensors      the task bank
    tokenizer/             the base model's tokenizer files

Writing: :func:`mpt_export.atomic.replace_dir` (staged beside the path, swapped in atomically, only ever replacing
a bundle this tool wrote).

Reading: :func:`load_bundle` opens the directory once and keeps that handle (a directory file descriptor with a
shared ``flock``); the manifest and every file are read through it, so a reader sees one bundle whole even while a
writer swaps in a new one (the swap moves the name, not the directory the reader holds), and the writer leaves the
old copy on disk until the last reader lets go. On Linux the handle is reachable as a path
(``/proc/self/fd/N``) that ONNX Runtime, TensorRT and ``tokenizers`` can open.

Integrity: the manifest carries its own sha256 (over its canonical JSON) and the sha256 of every file; paths in it
are relative, plain and stay inside the bundle (no ``..``, no symbolic links); the fields the runtime trusts are
checked against each other and the graph I/O specs at load, against the graphs themselves when a session opens, and
the task list against ``tasks.safetensors``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import time
from pathlib import Path, PurePosixPath

from .errors import BundleError

MANIFEST = "manifest.json"
FORMAT = "mpt-export/bundle/2"
DIGEST_KEY = "manifest_sha256"
REQUIRED = {"CAUSAL_LM": ("backbone.onnx", "backbone.onnx.data", "composer.onnx", "tasks.safetensors"),
            "SEQ_2_SEQ_LM": ("encoder.onnx", "decoder.onnx", "weights.onnx.data", "composer.onnx", "tasks.safetensors")}
GRAPHS = {"CAUSAL_LM": ("backbone", "composer"), "SEQ_2_SEQ_LM": ("encoder", "decoder", "composer")}
DTYPES = ("float32", "float16", "bfloat16")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20
_REDO = "copy the bundle again or re-export it"


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 1 MiB chunks (bounded memory for multi-GB weights)."""
    with open(path, "rb") as f:
        return _sha256_stream(f.fileno())


def _sha256_stream(fd: int) -> str:
    h = hashlib.sha256()
    while True:
        chunk = os.read(fd, _CHUNK)
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
    from .atomic import STAGING_MARKER

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
                       f"{_REDO}")


def _posint(d: dict, key: str, where: str, zero: bool = False) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < (0 if zero else 1):
        raise _bad(f"{where}.{key}" if where else key, v, "a non-negative integer" if zero else "a positive integer")
    return v


def check_manifest(m) -> None:
    """Every field the runtime trusts: present, of the right type, consistent with the others and the graph specs."""
    from .taskbank import TASK_NAME_RE

    if not isinstance(m, dict):
        raise _bad("the top level", type(m).__name__, "a JSON object")
    task_type = m.get("task_type")
    if task_type not in REQUIRED:
        raise _bad("task_type", task_type, f"one of {', '.join(REQUIRED)}")
    if m.get("dtype", "float32") not in DTYPES:
        raise _bad("dtype", m.get("dtype"), f"one of {', '.join(DTYPES)}")
    files = m.get("files")
    if not isinstance(files, dict) or not files:
        raise _bad("files", files, "an object mapping each file to its sha256")
    for rel, digest in files.items():
        if not safe_relpath(rel) or rel == MANIFEST:
            raise BundleError(f"{MANIFEST} lists the file {rel!r}; every bundle path must be relative and stay inside "
                              f"the bundle (no '..', no absolute path) — the manifest was edited; {_REDO}")
        if not isinstance(digest, str) or not _HEX64.match(digest):
            raise _bad(f"files[{rel!r}]", digest, "a sha256 hex digest")
    for req in REQUIRED[task_type]:
        if req not in files:
            raise BundleError(f"{MANIFEST} does not list {req}; the bundle is incomplete — {_REDO}")
    bm = m.get("base_model")
    if not isinstance(bm, dict):
        raise _bad("base_model", bm, "an object")
    for key in ("hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim", "vocab_size",
                "max_positions"):
        _posint(bm, key, "base_model")
    graphs = m.get("graphs")
    if not isinstance(graphs, dict) or set(graphs) != set(GRAPHS[task_type]):
        raise _bad("graphs", sorted(graphs) if isinstance(graphs, dict) else graphs,
                   f"the graphs {', '.join(GRAPHS[task_type])}")
    for g, spec in graphs.items():
        if not isinstance(spec, dict) or spec.get("file") not in files:
            raise _bad(f"graphs.{g}.file", spec.get("file") if isinstance(spec, dict) else spec, "a file of the bundle")
        if spec.get("external_data") is not None and spec["external_data"] not in files:
            raise _bad(f"graphs.{g}.external_data", spec["external_data"], "a file of the bundle")
        for side in ("inputs", "outputs"):
            io = spec.get(side)
            if not isinstance(io, list) or not all(
                    isinstance(x, dict) and isinstance(x.get("name"), str) and isinstance(x.get("dtype"), str)
                    and isinstance(x.get("shape"), list) and all(
                        isinstance(d, str) or (isinstance(d, int) and not isinstance(d, bool) and d >= 0)
                        for d in x["shape"]) for x in io):
                raise _bad(f"graphs.{g}.{side}", io, "a list of {name, dtype, shape: [int | axis name]}")
    _check_graph_fields(m, bm, graphs, task_type)
    for key in ("eos_token_id", "bos_token_id", "decoder_start_token_id", "pad_token_id"):
        v = bm.get(key)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < bm["vocab_size"]
                                     for i in ids):
            raise _bad(f"base_model.{key}", v, f"a token id below the vocabulary size {bm['vocab_size']} (or null)")
    for key in ("validation", "quantization", "tokenizer"):
        if m.get(key) is not None and not isinstance(m[key], dict):
            raise _bad(key, m[key], "an object or null")
    for key in ("atol", "rtol"):
        v = (m.get("validation") or {}).get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
            raise _bad(f"validation.{key}", v, "a finite number >= 0")
    tasks = m.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise _bad("tasks", tasks, "a non-empty list")
    seen = set()
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not TASK_NAME_RE.match(t["name"]):
            raise _bad(f"tasks[{i}].name", t.get("name") if isinstance(t, dict) else t, "a task name ([A-Za-z0-9_.-]+)")
        if t["name"] in seen:
            raise _bad(f"tasks[{i}].name", t["name"], "a name used once")
        seen.add(t["name"])
        for key in ("prompt_len", "rank"):
            _posint(t, key, f"tasks[{i}]")
        for key in ("shared_prompt", "bytes", "index_in_source"):
            if key in t or key == "shared_prompt":
                _posint(t, key, f"tasks[{i}]", zero=True)
        for key in ("source", "digest"):
            if key in t and not isinstance(t[key], str):
                raise _bad(f"tasks[{i}].{key}", t[key], "a string")
    nts = m.get("num_transformer_submodules", 1)
    if nts not in (1, 2):
        raise _bad("num_transformer_submodules", nts, "1 or 2")
    for i, t in enumerate(tasks):  # every task must leave room for one input token and one new token
        T, P = t["prompt_len"], bm["max_positions"]
        n = T // nts
        need = max(n + 1, T - n + 2) if task_type == "SEQ_2_SEQ_LM" else T + 2
        if need > P:
            raise _bad("base_model.max_positions", P, f"at least {need} for task {t['name']!r} ({T} virtual tokens)")


def _spec(graph: dict, side: str, name: str) -> dict | None:
    return next((x for x in graph[side] if x["name"] == name), None)


def _check_graph_fields(m: dict, bm: dict, graphs: dict, task_type: str) -> None:
    """The base-model numbers the runtime uses must be those of the graph I/O specs."""
    dtype = m.get("dtype", "float32")
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


# -- reading -------------------------------------------------------------------------------------------------------

_PROC_FD = Path("/proc/self/fd")


def _open_in(dirfd: int, rel: str, display: str) -> int:
    """Open ``rel`` under ``dirfd`` for reading, refusing symbolic links at every level."""
    parts = rel.split("/")
    cur, opened = dirfd, []
    try:
        for part in parts[:-1]:
            cur = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=cur)
            opened.append(cur)
        # O_NONBLOCK: a FIFO put in a file's place must not hang the reader (no effect on regular files)
        fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=cur)
    except FileNotFoundError:
        raise BundleError(f"bundle file {rel} is missing from {display}; the bundle is incomplete — {_REDO}") from None
    except NotADirectoryError:
        raise BundleError(f"bundle path {rel} in {display} is not laid out as a directory; {_REDO}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise BundleError(f"bundle file {rel} in {display} is a symbolic link; bundles hold plain files only "
                              f"(links could point outside it) — {_REDO}") from None
        raise BundleError(f"cannot read bundle file {rel} in {display} ({e.strerror}); check its permissions") from None
    finally:
        for o in opened:
            os.close(o)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"bundle file {rel} in {display} is not a regular file; {_REDO}")
    return fd


def _open_dir(path: Path) -> int:
    """A descriptor of the bundle directory with a shared lock (writers delete an old copy only when no reader holds
    it). A directory retired between our open and our lock has no manifest (the writer removes it first): reopen."""
    import fcntl

    from .atomic import recover

    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if recover(path):
                continue
            raise BundleError(f"bundle {path} does not exist; create one with `mpt-export export`") from None
        except NotADirectoryError:
            raise BundleError(f"{path} is a file, not a bundle directory; pass the directory that "
                              "`mpt-export export --out` wrote") from None
        except OSError as e:
            raise BundleError(f"cannot open bundle {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass  # no locks here (some network filesystems): readers still see one directory whole
        try:
            os.stat(MANIFEST, dir_fd=fd, follow_symlinks=False)
            return fd
        except FileNotFoundError:
            if not os.listdir(fd):  # retired under us (emptied): the path has the new bundle now
                os.close(fd)
                time.sleep(0.01)
                continue
            os.close(fd)
            raise BundleError(f"{path} has no {MANIFEST}; it is not an mpt-export bundle (or its export did not "
                              "finish)") from None
        except OSError as e:
            os.close(fd)
            raise BundleError(f"cannot read {path} ({e.strerror})") from None
    raise BundleError(f"bundle {path} kept changing while it was opened; try again")


def _read_manifest(fd: int, path: Path) -> dict:
    mfd = _open_in(fd, MANIFEST, str(path))
    try:
        with os.fdopen(mfd, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise BundleError(f"cannot read {path / MANIFEST} ({e.strerror})") from None
    try:
        manifest = json.loads(raw)
    except RecursionError:
        raise BundleError(f"{path / MANIFEST} is nested too deeply to be a manifest; the bundle is damaged — "
                          f"{_REDO}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({e}); the bundle is damaged — {_REDO}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        if isinstance(found, str) and found.startswith("mpt-export/bundle/"):
            raise BundleError(f"{path} is a {found} bundle; this mpt-export reads {FORMAT} — re-export it with this "
                              "version")
        raise BundleError(f"{path / MANIFEST} has format {found!r}, expected {FORMAT!r}; it is not an mpt-export "
                          "bundle (or was written by another version — re-export it)")
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        raise BundleError(f"{path / MANIFEST} does not match its own sha256 ({DIGEST_KEY}); it was edited or "
                          f"corrupted — {_REDO}")
    check_manifest(manifest)
    return manifest


class BundlePath(type(Path())):
    """A path into an open bundle that keeps the bundle (and so its directory handle) alive while it is in use:
    ``load_bundle(p).file("backbone.onnx")`` stays valid although the Bundle object itself is dropped."""

    _keep = None


def _bundle_path(bundle: "Bundle", p: Path) -> Path:
    out = BundlePath(p)
    out._keep = bundle
    return out


class Bundle:
    """A loaded (checksum-verified) bundle, read through one directory handle taken at open (see module docstring).
    Close it (or use ``with``) to let a writer delete the copy it holds once it has been replaced."""

    def __init__(self, path: Path, manifest: dict, fd: int | None = None):
        self.path = Path(path)
        self.manifest = manifest
        self._fd = fd
        self._bank = None

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, tasks={self.tasks})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self):
        self.close()

    @property
    def root(self) -> Path:
        """A path to the directory this bundle was opened as (stable while a writer replaces ``path``)."""
        if self._fd is not None and _PROC_FD.is_dir():
            return _PROC_FD / str(self._fd)
        return self.path

    @property
    def tasks(self) -> list[str]:
        return [t["name"] for t in self.manifest["tasks"]]

    @property
    def task_type(self) -> str:
        return self.manifest["task_type"]

    @property
    def base_model(self) -> dict:
        return self.manifest["base_model"]

    def has_file(self, name: str) -> bool:
        return name in self.manifest["files"]

    def file(self, name: str) -> Path:
        """The path to read bundle file ``name`` (one the manifest lists) through this bundle's handle."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path} has no file {name!r} in its manifest")
        return _bundle_path(self, self.root / name) if self._fd is not None else self.path / name

    def read_bytes(self, name: str) -> bytes:
        self.file(name)
        if self._fd is None:
            return (self.path / name).read_bytes()
        fd = _open_in(self._fd, name, str(self.path))
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def task_bank(self):
        """The task bank, checked against the manifest's task list (names, order, shapes, content digests)."""
        from .taskbank import TaskBank

        bank = TaskBank.load(self.file("tasks.safetensors"))
        want = [(t["name"], t["shared_prompt"], t["prompt_len"], t["rank"], t.get("digest"))
                for t in self.manifest["tasks"]]
        have = [(t.name, t.shared, int(bank.shared[t.shared].shape[0]), t.rank, t.digest(bank.shared[t.shared]))
                for t in bank.tasks]
        if len(want) != len(have) or any(w[:4] != h[:4] or (w[4] is not None and w[4] != h[4])
                                         for w, h in zip(want, have)):
            raise BundleError(f"{self.path}: the manifest's task list ({', '.join(w[0] for w in want)}) does not "
                              f"match tasks.safetensors ({', '.join(h[0] for h in have)}); {_REDO}")
        if bank.num_transformer_submodules != self.manifest.get("num_transformer_submodules", 1) \
                or bank.task_type != self.task_type:
            raise BundleError(f"{self.path}: tasks.safetensors was written for another model kind; {_REDO}")
        if bank.hidden_size != self.base_model["hidden_size"]:
            raise BundleError(f"{self.path}: tasks.safetensors holds prompts of width {bank.hidden_size}, the model's "
                              f"hidden size is {self.base_model['hidden_size']}; {_REDO}")
        return bank

    def sizes(self) -> dict[str, int]:
        """Bytes per component: the model graphs and their weights, composer, task bank, tokenizer, manifest."""
        comp: dict[str, int] = {}
        for rel in sorted([*self.manifest["files"], MANIFEST]):
            try:
                size = os.stat(self.root / rel).st_size
            except OSError:
                continue
            key = "tokenizer" if rel.startswith("tokenizer/") else rel.split(".")[0]
            key = {"weights": "weights (shared)"}.get(key, key)
            comp[key] = comp.get(key, 0) + size
        return comp

    def session(self, provider: str = "cpu", backend: str = "onnxruntime", engines: str | Path | None = None,
                **options):
        """Shortcut to :func:`mpt_export.runtime.open_session` over this bundle."""
        from .runtime import open_session

        return open_session(self, provider=provider, backend=backend, engines=engines, **options)


def load_bundle(path: str | Path, verify: bool = True) -> Bundle:
    """Open a bundle directory: its manifest's own digest and fields are checked; with ``verify`` (default) every
    file's sha256 too. The bundle is read through one handle taken here (see the module docstring)."""
    path = Path(path)
    fd = _open_dir(path)
    try:
        manifest = _read_manifest(fd, path)
        for rel, digest in manifest["files"].items():
            ffd = _open_in(fd, rel, str(path))
            try:
                if verify and _sha256_stream(ffd) != digest:
                    raise BundleError(f"bundle file {rel} does not match its sha256 in {MANIFEST}; it was modified or "
                                      f"corrupted — {_REDO}")
            except OSError as e:
                raise BundleError(f"cannot read bundle file {rel} in {path} ({e.strerror}); check its "
                                  "permissions") from None
            finally:
                os.close(ffd)
    except BaseException:
        os.close(fd)
        raise
    return Bundle(path, manifest, fd)

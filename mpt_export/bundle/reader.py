"""The bundle: a directory users copy to a device.

    manifest.json          format, tool versions, base-model identity, graph I/O, tasks, sha256 of every file,
                           the validation report, and the sha256 of the manifest itself
    backbone.onnx(.data)   the frozen base model, weights stored once
    composer.onnx          shared_prompt ⊙ (task_cols @ task_rows)
    tasks.safetensors      the task bank (and tasks/*.safetensors: one segment per later edit, see bankfile.py)
    tokenizer/             the base model's tokenizer files

Writing: :func:`mpt_export.storage.atomic.replace_dir` (staged beside the path, swapped in atomically, only ever replacing
a bundle this tool wrote).

Reading: :func:`load_bundle` opens the directory once and keeps that handle (a directory file descriptor with a
shared ``flock``); the manifest and every file are read through it, so a reader sees one bundle whole even while a
writer swaps in a new one (the swap moves the name, not the directory the reader holds), and the writer leaves the
old copy on disk until the last reader lets go. On Linux the handle is reachable as a path
(``/proc/self/fd/N``) that ONNX Runtime, TensorRT and ``tokenizers`` can open. The directory handle, the opening of
files through it and the walk refusing links are :mod:`mpt_export.bundle.directory`.

Integrity: the manifest carries its own sha256 (over its canonical JSON) and the sha256 of every file; paths in it
are relative, plain and stay inside the bundle (no ``..``); a symbolic link anywhere inside the bundle, listed or
not, is refused at load (files the manifest does not list are never read); the fields the runtime trusts are checked
against each other and the graph I/O specs at load, against the graphs themselves when a session opens, and the task
list against ``tasks.safetensors`` (names, order, shapes, per-task content digests) by every reader and by a
verifying load. Files are hashed in chunks (bounded memory); a verification stamp kept
outside the bundle (:mod:`mpt_export.bundle.stamps`) lets later opens of unchanged files skip the hashing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import BundleError, CheckpointError
from .info import BundleInfo
from .directory import open_dir, open_in, read_in, refuse_links
from .manifest import (DIGEST_KEY, FORMAT, MANIFEST, READABLE, REDO, check_manifest, check_positions,
                       manifest_digest, sha256_stream)
from . import stamps
from ..runtime import open_session
from .bankfile import load_files, merged_index
from .taskbank import name_list

# -- reading -------------------------------------------------------------------------------------------------------

_PROC_FD = Path("/proc/self/fd")


def _read_manifest(fd: int, path: Path) -> dict:
    raw = read_in(fd, MANIFEST, path)
    try:
        manifest = json.loads(raw)
    except RecursionError:
        raise BundleError(f"{path / MANIFEST} is nested too deeply to be a manifest; the bundle is damaged — "
                          f"{REDO}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{path / MANIFEST} is not valid JSON ({e}); the bundle is damaged — {REDO}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        if isinstance(found, str) and found.startswith("mpt-export/bundle/"):
            raise BundleError(f"{path} is a {found} bundle; this mpt-export reads {FORMAT} — re-export it with this "
                              "version")
        raise BundleError(f"{path / MANIFEST} has format {found!r}, expected {FORMAT!r}; it is not an mpt-export "
                          "bundle (or was written by another version — re-export it)")
    if manifest.get(DIGEST_KEY) != manifest_digest(manifest):
        raise BundleError(f"{path / MANIFEST} does not match its own sha256 ({DIGEST_KEY}); it was edited or "
                          f"corrupted — {REDO}")
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
        self.info = BundleInfo.of(manifest, str(self.path / MANIFEST))  # the typed view every reader uses
        self._fd = fd
        self._bank = None
        if manifest.get("tasks") is None:  # format 3: the task list is the task files' index (headers only)
            try:
                entries = self._task_files(merged_index)
                if entries:  # the task with the longest prompt is the one that could not fit
                    top = max(entries, key=lambda e: e.prompt_len)
                    check_positions(self.info.num_transformer_submodules, self.info.base_model.max_positions,
                                    [{"name": top.name, "prompt_len": top.prompt_len}], self.info.task_type)
                if not entries:
                    raise BundleError(f"{self.path}: its task files hold no task; a bundle keeps at least one — "
                                      f"{REDO}")
            except BaseException:
                self._fd = None  # the caller closes the handle it gave
                raise
            self.info = BundleInfo.of(manifest, str(self.path / MANIFEST), tasks=entries)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, tasks={self.tasks})"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self, _os_close=os.close) -> None:  # bound now: at interpreter exit __del__ may find ``os`` gone
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                _os_close(fd)
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
        return self.info.task_names

    @property
    def task_type(self) -> str:
        return self.info.task_type

    @property
    def base_model(self) -> dict:
        return self.manifest["base_model"]

    def has_file(self, name: str) -> bool:
        return name in self.info.files

    def file(self, name: str) -> Path:
        """The path to read bundle file ``name`` (one the manifest lists) through this bundle's handle."""
        if name not in self.info.files:
            raise BundleError(f"{self.path} has no file {name!r} in its manifest")
        return _bundle_path(self, self.root / name) if self._fd is not None else self.path / name

    def read_bytes(self, name: str) -> bytes:
        self.file(name)
        if self._fd is None:
            return (self.path / name).read_bytes()
        return read_in(self._fd, name, self.path)

    def _task_files(self, read):
        """``read(paths)`` over the task files, through this bundle's handle; errors name the bundle's paths."""
        paths = [self.file(rel) for rel in self.info.task_files]
        try:
            return read(paths)
        except CheckpointError as e:  # say the bundle's path, not the handle's /proc path
            msg = str(e)
            for rel, p in zip(self.info.task_files, paths):
                msg = msg.replace(str(p), str(self.path / rel))
            raise BundleError(msg) from None

    def task_bank(self):
        """The task bank its files make, every task checked, and checked against the task list (format 2: the
        manifest's, with sizes and content digests) — the check every reader runs, and :func:`load_bundle` too when
        it verifies."""
        bank = self._task_files(load_files)
        check_task_bank(self.info, bank, self.path)
        return bank

    def sizes(self) -> dict[str, int]:
        """Bytes per component: the model graphs and their weights, composer, task bank, tokenizer, manifest."""
        comp: dict[str, int] = {}
        for rel in sorted([*self.info.files, MANIFEST]):
            try:
                size = os.stat(self.root / rel).st_size
            except OSError:
                continue
            key = "tokenizer" if rel.startswith("tokenizer/") else rel.split(".")[0]
            key = {"weights": "weights (shared)"}.get(key, key)
            comp[key] = comp.get(key, 0) + size
        return comp

    def verify(self, trust_stamp: bool = True, bank: bool = True) -> "Bundle":
        """Check every file against its sha256 and (``bank``) every task of the task bank, through the handle this
        bundle was opened with (the directory it holds, whatever has moved to its path since): what
        ``load_bundle(path)`` checks, for a bundle opened with ``verify=False``. -> this bundle."""
        if self._fd is None:
            raise BundleError(f"{self.path} is closed; open it again to verify it")
        _check_files(self._fd, self.path, self.manifest, True, trust_stamp)
        if bank:
            self.task_bank()
        return self

    def session(self, options=None, **changes):
        """A session over this bundle: :func:`mpt_export.runtime.open_session` with ``options`` (a
        :class:`~mpt_export.runtime.SessionOptions`) or its fields as keywords (``provider``, ``backend``,
        ``engines``, ``intra_op_threads``, ``prepack``, ...)."""
        return open_session(self, options, **changes)


def _task_differences(info, bank) -> list[str]:
    """Per task of the manifest, what tasks.safetensors holds differently (names and order already equal)."""
    out = []
    for w, t in zip(info.tasks, bank.tasks):
        shared = bank.shared[t.shared] if 0 <= t.shared < len(bank.shared) else None
        found = {"shared prompt": t.shared, "prompt length": None if shared is None else int(shared.shape[0]),
                 "rank": t.rank,  # the digest only where the task list records one (format 2): hashing costs
                 "content digest": None if shared is None or w.digest is None else t.digest(shared)}
        expected = {"shared prompt": w.shared_prompt, "prompt length": w.prompt_len, "rank": w.rank,
                    "content digest": w.digest}
        diffs = [f"{k} {expected[k]} expected, {found[k]} found" for k in expected
                 if expected[k] is not None and expected[k] != found[k]]
        if diffs:
            out.append(f"task {w.name!r} ({'; '.join(diffs)})")
    return out


def check_task_bank(info, bank, path: Path) -> None:
    """``tasks.safetensors`` must hold exactly the manifest's tasks: same names in the same order, and per task the
    shared prompt, prompt length, rank and content digest the manifest records (a task bank edited after the bundle
    was written — vectors swapped between tasks, say — is refused even when every file's sha256 was recomputed).
    ``info``: the bundle's typed manifest."""
    want = info.task_names
    have = bank.names
    if want != have:
        if sorted(want) == sorted(have):
            what = "holds the same tasks in another order"
        else:
            parts = [f"lacks {', '.join(repr(n) for n in want if n not in have)}" if set(want) - set(have) else "",
                     f"also holds {', '.join(repr(n) for n in have if n not in want)}" if set(have) - set(want) else ""]
            what = " and ".join(p[:300] for p in parts if p)
        raise BundleError(f"{path}: the task list ({name_list(want)}) does not match the task files "
                          f"({name_list(have)}): the task bank {what}; it was changed after the bundle was written — "
                          f"{REDO}")
    differs = _task_differences(info, bank)
    if differs:
        raise BundleError(f"{path}: tasks.safetensors does not hold the vectors the manifest records for "
                          f"{' and '.join(differs)}; the task bank was changed after the bundle was written — {REDO}")
    if bank.num_transformer_submodules != info.num_transformer_submodules or bank.task_type != info.task_type:
        raise BundleError(f"{path}: tasks.safetensors was written for another model kind ({bank.task_type}, "
                          f"num_transformer_submodules {bank.num_transformer_submodules}; the manifest says "
                          f"{info.task_type}, {info.num_transformer_submodules}); {REDO}")
    if bank.hidden_size != info.base_model.hidden_size:
        raise BundleError(f"{path}: tasks.safetensors holds prompts of width {bank.hidden_size}, the model's hidden "
                          f"size is {info.base_model.hidden_size}; {REDO}")


def load_bundle(path: str | Path, verify: bool = True, trust_stamp: bool = True) -> Bundle:
    """Open a bundle directory: its manifest's own digest and fields are checked, and a symbolic link anywhere in
    it is refused; with ``verify`` (default) every file's sha256 too — except files that a verification stamp (see
    :mod:`mpt_export.bundle.stamps`) shows unchanged since they were last hashed, unless ``trust_stamp`` is False — and the
    task bank against the manifest's task list (:func:`check_task_bank`, as every reader does). The bundle is read
    through one handle taken here (see the module docstring); ``verify=False`` and :meth:`Bundle.verify` later
    check the same directory as one verifying open."""
    path = Path(path)
    fd = open_dir(path)
    try:
        manifest = _read_manifest(fd, path)
        refuse_links(fd, path)
        _check_files(fd, path, manifest, verify, trust_stamp)
        bundle = Bundle(path, manifest, fd)
    except BaseException:
        os.close(fd)
        raise
    if verify:  # the readers' own check of the task bank: a bundle that verifies is one every reader opens
        try:
            bundle.task_bank()
        except BaseException:
            bundle.close()
            raise
    return bundle


def _check_files(fd: int, path: Path, manifest: dict, verify: bool, trust_stamp: bool) -> None:
    """Every file the manifest lists is there (opened through ``fd``); with ``verify``, it matches its sha256 (or
    a stamp vouches for it), and the files hashed are stamped."""
    dir_stat = os.fstat(fd)
    stamp = stamps.read(dir_stat, manifest[DIGEST_KEY]) if verify and trust_stamp else {}
    started, hashed, vouched = time.time_ns(), False, {}
    for rel, digest in manifest["files"].items():
        ffd = open_in(fd, rel, str(path))
        try:
            st = os.fstat(ffd)
            if not verify:
                continue
            if stamps.trusted(stamp, rel, digest, st):
                vouched[rel] = stamp[rel]
                continue
            if sha256_stream(ffd) != digest:
                raise BundleError(f"bundle file {rel} does not match its sha256 in {MANIFEST}; it was modified or "
                                  f"corrupted — {REDO}")
            hashed = True
            if stamps.file_key(os.fstat(ffd)) == stamps.file_key(st) and stamps.stampable(st, started):
                vouched[rel] = [digest, *stamps.file_key(st)]
        except OSError as e:
            raise BundleError(f"cannot read bundle file {rel} in {path} ({e.strerror}); check its "
                              "permissions") from None
        finally:
            os.close(ffd)
    if hashed:
        stamps.write(dir_stat, manifest[DIGEST_KEY], vouched)

"""What this tool wrote, and may therefore replace or delete: never a directory (or file) it did not write.

A bundle has our ``manifest.json`` (and holds only the files it lists), an engines folder our ``engine.json``, a
demo or bench workdir our ``.mpt-export`` marker (recording every file once finished). Anything else — a user's
directory, files added to one of ours, links — is refused untouched, ``--force`` or not; so is an output that is,
holds or lies inside an input of the same command, a read-only directory, and a path that is not UTF-8. The writer
itself (locks, staging, the atomic swap) is in ``atomic.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

from ..errors import OutputExistsError

STAGING_MARKER = ".mpt-export-staging"
WORKDIR_MARKER = ".mpt-export"
TAG = "mpt-export"  # in every temporary name: .<name>.mpt-export-tmp-*, -old-*, -swap-*, .<name>.mpt-export.lock


def _ours_beside(name: str, outputs) -> bool:
    """A lock file or temporary this module leaves beside one of ``outputs`` (names)."""
    return any(name == f".{o}.{TAG}.lock" or re.match(rf"^\.{re.escape(o)}\.{TAG}-(tmp|old|swap)-", name)
               for o in outputs)


# What an ownership check reads whole: far above any manifest we write (a 100,000-task manifest is tens of MB), so a
# valid one is never cut; a bigger file under one of our names is not ours (and is not read into memory).
OURS_MAX_BYTES = 1 << 30


def _read_ours(file: Path) -> bytes | None:
    """A regular file's whole bytes (never blocks on a FIFO, never follows a link), or None — also for a file over
    OURS_MAX_BYTES. Never a prefix: a cut JSON file would not be recognised as ours."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > OURS_MAX_BYTES:
            return None
        chunks, total = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            total += len(chunk)
            if total > OURS_MAX_BYTES:  # grew while we read
                return None
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def _json_field(file: Path, key: str, default):
    raw = _read_ours(file)
    if raw is None:
        return default
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return default
    value = data.get(key, default) if isinstance(data, dict) else default
    return value if isinstance(value, type(default)) else default


def dir_kind(path: Path) -> str | None:
    """What this tool wrote at ``path``: 'bundle', 'engines', a workdir kind, 'staging', 'empty', or None (not ours)."""
    path = Path(path)
    try:
        names = os.listdir(path)
    except OSError:
        return None
    if not names:
        return "empty"
    if STAGING_MARKER in names:
        return "staging"
    if "manifest.json" in names and _json_field(path / "manifest.json", "format", "").startswith("mpt-export/bundle/"):
        return "bundle"
    if "engine.json" in names and _json_field(path / "engine.json", "format", "").startswith("mpt-export/engine/"):
        return "engines"
    if WORKDIR_MARKER in names:
        return _json_field(path / WORKDIR_MARKER, "kind", "") or None
    return None


def _tree(path: Path) -> tuple[list[str], list[str], list[str]]:
    """(files, directories, links) under ``path``, relative POSIX paths; links are never followed."""
    files, dirs, links = [], [], []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
        rel = Path(dirpath).relative_to(path)
        for d in dirnames:
            (links if os.path.islink(os.path.join(dirpath, d)) else dirs).append((rel / d).as_posix())
        for f in filenames:
            (links if os.path.islink(os.path.join(dirpath, f)) else files).append((rel / f).as_posix())
    return sorted(files), sorted(dirs), sorted(links)


def foreign_entries(path: Path, kind: str) -> list[str]:
    """What inside a directory of ours this tool did not write: for a bundle, anything its manifest does not list;
    for a finished workdir, anything its marker did not record (bundles in it by their own manifests; our lock files
    and temporaries beside its outputs by name); for an unfinished workdir, top-level entries it does not name.
    Links always count as foreign (we never write them)."""
    path = Path(path)
    files, dirs, links = _tree(path)
    if kind == "bundle":
        raw = _read_ours(path / "manifest.json")
        try:
            listed = set(json.loads(raw).get("files") or {}) if raw else set()
        except (ValueError, UnicodeDecodeError, RecursionError, AttributeError):
            listed = set()
        listed |= {"manifest.json", STAGING_MARKER}
        parents = {p.as_posix() for f in listed for p in Path(f).parents if p.as_posix() != "."}
        return links + [f for f in files if f not in listed] + [d for d in dirs if d not in parents]
    marker = path / WORKDIR_MARKER
    if kind in ("engines", "empty", "staging") or not marker.is_file():
        return links
    top = _json_field(marker, "contents", [])
    recorded = _json_field(marker, "files", [])
    if not recorded:  # an unfinished workdir: only the top-level entries it names
        return links + sorted(n for n in os.listdir(path) if n not in top and n != WORKDIR_MARKER
                              and not _ours_beside(n, top))
    known = set(recorded) | {WORKDIR_MARKER}
    foreign = list(links)
    bundles = {n for n in top if dir_kind(path / n) == "bundle"}
    for n in bundles:  # a bundle in the workdir may have been changed since (tasks add): its manifest says what is ours
        foreign += [f"{n}/{x}" for x in foreign_entries(path / n, "bundle")]
    for f in files:
        first = f.split("/", 1)[0]
        if f not in known and first not in bundles and not _ours_beside(first, top):
            foreign.append(f)
    covered = {p.as_posix() for f in known for p in Path(f).parents if p.as_posix() != "."}
    foreign += [d for d in dirs if d not in covered and d.split("/", 1)[0] not in bundles
                and not _ours_beside(d.split("/", 1)[0], top)]
    return sorted(set(foreign))


_KIND_HINT = {"bundle": "a bundle has our manifest.json", "engines": "an engines folder has our engine.json"}


def check_path_text(path: Path) -> None:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise OutputExistsError(f"the path {os.fsdecode(os.fsencode(path))!a} is not valid UTF-8; ONNX tools cannot "
                                "open it — choose a path in UTF-8") from None


def check_replaceable(out: Path, kind: str, force: bool, inputs=(), allow_replace: bool = False) -> None:
    """Refuse (one line, nothing touched) unless ``out`` is missing, empty, or a ``kind`` directory this tool wrote
    that holds nothing else (and ``force`` or ``allow_replace``); never an input of the same command, a directory
    holding one or a directory inside one; never a read-only directory."""
    out = Path(out)
    check_path_text(out)
    check_not_input(out, inputs)
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise OutputExistsError(f"output {out} exists and is not a directory; choose another output path")
    found = dir_kind(out)
    if found == "empty":
        return
    if found != kind:
        what = {None: "was not written by mpt-export", "staging": "is an unfinished mpt-export write"}.get(
            found, f"holds an mpt-export {found}, not a {kind}")
        hint = _KIND_HINT.get(kind, f"a {kind} directory has our {WORKDIR_MARKER} marker")
        raise OutputExistsError(
            f"output {out} exists and {what}; mpt-export only replaces what it wrote ({hint}), even with --force — "
            "choose another output path or move that directory yourself")
    if not (force or allow_replace):
        raise OutputExistsError(f"output {out} already exists; choose another output path or pass --force to replace it")
    if not os.access(out, os.W_OK):
        raise OutputExistsError(f"output {out} is read-only (no write permission on the directory); make it writable "
                                "first if it should change")
    foreign = foreign_entries(out, found)
    if foreign:
        raise OutputExistsError(
            f"output {out} is an mpt-export {found} but also holds files mpt-export did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); replacing it would delete them — move "
            "them out first or choose another output path")


def check_not_input(out: Path, inputs) -> None:
    """The output of a command must not be one of its inputs, hold one, or lie inside one."""
    real_out = os.path.realpath(out)
    for label, p in inputs:
        if p is None:
            continue
        real_in = os.path.realpath(p)
        same = real_in == real_out
        if not same and os.path.exists(out) and os.path.exists(p):
            try:
                same = os.path.samefile(out, p)
            except OSError:
                pass
        if same:
            raise OutputExistsError(f"output {out} is the {label} this command reads; choose another output path")
        if real_in.startswith(real_out.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"output {out} holds the {label} this command reads ({p}); choose another output path")
        if real_out.startswith(real_in.rstrip(os.sep) + os.sep):
            raise OutputExistsError(f"output {out} lies inside the {label} this command reads ({p}); an input is never "
                                    "changed — choose another output path")


def claim_workdir(path: Path, kind: str, contents: list[str] | None = None) -> Path:
    """Create ``path`` (or take an empty or same-kind one) and mark it as a ``kind`` workdir of this tool, naming
    the top-level ``contents`` it will write. :func:`seal_workdir` records every file once the work is done;
    anything else found there later is the user's and is never deleted."""
    path = Path(path)
    found = dir_kind(path) if path.is_dir() else None
    if path.exists() and found not in ("empty", kind):
        check_replaceable(path, kind, force=True)  # raises the right message
    path.mkdir(parents=True, exist_ok=True)
    marker = path / WORKDIR_MARKER
    if not marker.exists():
        marker.write_text(json.dumps({"kind": kind, "written_by": "mpt-export", "contents": contents or []}) + "\n")
    else:  # a workdir an earlier version claimed: this version may write more names (its own, from now on)
        data = json.loads(marker.read_text())
        missing = [c for c in contents or [] if c not in data.get("contents", [])]
        if missing:
            data["contents"] = data.get("contents", []) + missing
            _rewrite_marker(marker, data)
    return path


def _rewrite_marker(marker: Path, data: dict) -> None:
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, marker)


def seal_workdir(path: Path) -> None:
    """Record every file of a finished workdir in its marker (what a later run may delete)."""
    marker = Path(path) / WORKDIR_MARKER
    data = json.loads(marker.read_text())
    data["files"] = [f for f in _tree(Path(path))[0] if f != WORKDIR_MARKER]
    _rewrite_marker(marker, data)


def remove_workdir(path: Path, kind: str) -> None:
    """Delete a workdir this tool wrote (``kind`` marker, nothing else in it); refuse anything else, touching
    nothing."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    check_replaceable(path, kind, force=True)
    rmtree_ours(path)


def rmtree_ours(path: Path) -> None:
    """Remove a tree of ours, making read-only directories in it writable on the way."""
    def retry(func, p, exc):
        parent = os.path.dirname(p)
        try:
            os.chmod(parent, stat.S_IMODE(os.lstat(parent).st_mode) | stat.S_IWUSR | stat.S_IXUSR)
            func(p)
        except OSError:
            pass

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda f, p, e: retry(f, p, e))

"""Directories written whole or not at all, and never a directory (or file) this tool did not write.

Every command that writes a directory (a bundle, an engines folder, a demo or bench workdir) goes through
:func:`replace_dir`:

1. **Ownership.** The output may be missing, empty, or a directory *this tool wrote, of the same kind* (a bundle
   has our ``manifest.json``, an engines folder our ``engine.json``, a workdir our ``.mpt-export`` marker) that holds
   nothing else (files a bundle's manifest does not list, entries a workdir's marker does not record, links). Anything
   else is refused untouched, ``--force`` or not; so is an output that is, holds or lies inside an input of the same
   command, a read-only output directory, and a path that is not UTF-8 (ONNX tools cannot open it).
2. **One writer at a time.** Writers of one path serialise on ``.<name>.mpt-export.lock`` beside it (``flock``;
   released by the kernel when a writer dies). A second writer waits a little, then fails with a clear message.
3. **Staging.** The new directory is written to ``.<name>.mpt-export-tmp-*`` beside the output (locked while its
   writer lives), fsynced, then
4. **swapped in atomically.** On Linux ``renameat2(RENAME_EXCHANGE)`` exchanges the two directories in one step:
   at every instant the path holds a whole directory, old or new. Where the filesystem cannot exchange (NFS, some
   FUSE mounts, other systems) the old directory is renamed to ``.<name>.mpt-export-swap-<staging id>`` and the new
   one into place; a writer killed between the two renames leaves the path empty for an instant, and the next open or
   write of that path renames the swap copy back (:func:`recover`) — only while the staging directory it pairs with
   still exists, i.e. only when the second rename never happened.
5. **Retiring the old copy.** Readers hold a shared ``flock`` on the directory they opened (see ``bundle.py``),
   so the old copy is deleted only when nobody reads it; otherwise it is left as ``.<name>.mpt-export-old-*`` and the
   next write of that path removes it. A writer never waits for a reader.

Every temporary name this module makes matches one strict pattern, so clean-up never mistakes a user's directory
for one of ours.

Interrupts: SIGINT is deferred while the swap happens, and :data:`WRITES` records what was committed, so the CLI
can say truthfully whether the output changed. A SIGKILL at any point leaves the old or the new directory at the
path, plus temporaries that the next write removes.

Fault injection for tests: ``MPT_EXPORT_FAULT_AT=N`` kills the process (``SIGKILL``; ``MPT_EXPORT_FAULT_SIGNAL=INT``
sends SIGINT instead) at the N-th :func:`fault_point` it passes; ``MPT_EXPORT_NO_EXCHANGE=1`` forces the two-rename
path.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import InputError, OutputExistsError

STAGING_MARKER = ".mpt-export-staging"
WORKDIR_MARKER = ".mpt-export"
TAG = "mpt-export"  # in every temporary name: .<name>.mpt-export-tmp-*, -old-*, -swap-*, .<name>.mpt-export.lock

# What this process committed (for truthful interrupt messages): [{"path": str, "state": "staging"|"committed"}]
WRITES: list[dict] = []

_fault_count = 0


def fault_point(name: str) -> None:
    """Test hook: stop the process here when this is the N-th fault point (``MPT_EXPORT_FAULT_AT=N``)."""
    global _fault_count
    at = os.environ.get("MPT_EXPORT_FAULT_AT")
    if not at:
        return
    _fault_count += 1
    if os.environ.get("MPT_EXPORT_FAULT_TRACE"):
        with open(os.environ["MPT_EXPORT_FAULT_TRACE"], "a") as f:
            f.write(f"{_fault_count} {name}\n")
    if _fault_count == int(at):
        sig = signal.SIGINT if os.environ.get("MPT_EXPORT_FAULT_SIGNAL") == "INT" else signal.SIGKILL
        os.kill(os.getpid(), sig)
        if sig == signal.SIGINT:
            time.sleep(0.5)  # let Python deliver it here, as a user's Ctrl-C would be


def lock_timeout() -> float:
    raw = os.environ.get("MPT_EXPORT_LOCK_TIMEOUT", "10")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise InputError(f"MPT_EXPORT_LOCK_TIMEOUT must be a number of seconds >= 0, got {raw!r}")
    return value


# -- names -----------------------------------------------------------------------------------------------------------

def _temp_name(out: Path, tag: str, ident: str | None = None) -> Path:
    ident = ident or f"{time.time_ns():x}-{os.urandom(3).hex()}"
    return out.parent / f".{out.name}.{TAG}-{tag}-{ident}"


def _siblings(out: Path, tag: str) -> list[Path]:
    """Our temporaries of ``tag`` beside ``out``: names only this module makes, matched strictly."""
    ident = r"[a-z0-9_]{8}" if tag in ("tmp", "swap") else r"[0-9a-f]+-[0-9a-f]{6}"
    pat = re.compile(rf"^\.{re.escape(out.name)}\.{TAG}-{tag}-{ident}$")
    try:
        names = os.listdir(out.parent)
    except OSError:
        return []
    return sorted((out.parent / n for n in names if pat.match(n)), key=lambda p: p.name)


def _ours_beside(name: str, outputs) -> bool:
    """A lock file or temporary this module leaves beside one of ``outputs`` (names)."""
    return any(name == f".{o}.{TAG}.lock" or re.match(rf"^\.{re.escape(o)}\.{TAG}-(tmp|old|swap)-", name)
               for o in outputs)


def _staging_id(tmp: Path) -> str:
    return tmp.name.rsplit("-", 1)[1]


# -- ownership -----------------------------------------------------------------------------------------------------

def _read_small(file: Path, limit: int = 1 << 20) -> bytes | None:
    """A small regular file's bytes (never blocks on a FIFO, never follows a link), or None."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)


def _json_field(file: Path, key: str, default):
    raw = _read_small(file)
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
        raw = _read_small(path / "manifest.json", 1 << 26)
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
    return path


def seal_workdir(path: Path) -> None:
    """Record every file of a finished workdir in its marker (what a later run may delete)."""
    marker = Path(path) / WORKDIR_MARKER
    data = json.loads(marker.read_text())
    data["files"] = [f for f in _tree(Path(path))[0] if f != WORKDIR_MARKER]
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, marker)


def remove_workdir(path: Path, kind: str) -> None:
    """Delete a workdir this tool wrote (``kind`` marker, nothing else in it); refuse anything else, touching
    nothing."""
    path = Path(path)
    if not os.path.lexists(path):
        return
    check_replaceable(path, kind, force=True)
    _rmtree(path)


def _rmtree(path: Path) -> None:
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


# -- the writer lock -----------------------------------------------------------------------------------------------

def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.{TAG}.lock"


_PROC_LOCKS: dict[str, threading.RLock] = {}
_DEPTH: dict[str, int] = {}
_REGISTRY = threading.Lock()


@contextmanager
def writer_lock(out: Path, timeout: float | None = None):
    """Exclusive lock for writers of ``out`` (a ``flock`` on ``.<name>.mpt-export.lock`` beside it). Re-entrant
    within a thread; yields True when already held."""
    import fcntl

    timeout = lock_timeout() if timeout is None else timeout
    lock = _lock_path(out)
    key = os.path.realpath(lock)
    with _REGISTRY:
        rlock = _PROC_LOCKS.setdefault(key, threading.RLock())
    if not rlock.acquire(timeout=max(timeout, 0.001)):
        raise OutputExistsError(f"another thread of this process is writing {out}; wait for it to finish")
    try:
        if _DEPTH.get(key, 0):
            _DEPTH[key] += 1
            try:
                yield True
            finally:
                _DEPTH[key] -= 1
            return
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666 & ~_umask())
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file")
        except OSError as e:
            why = "it is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise OutputExistsError(
                f"cannot write beside {out}: opening the lock file {lock.name} in {out.parent} failed ({why}); the "
                "output needs a writable parent directory where that name is free for mpt-export") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
                        who = f"mpt-export (pid {holder})" if holder.isdigit() else "another process"
                        raise OutputExistsError(
                            f"{who} is writing {out} (it holds {lock.name}); wait for it to finish and run this "
                            "again") from None
                    time.sleep(0.05)
                except OSError as e:  # no locks on this filesystem: go on without (single writer assumed)
                    if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                        break
                    raise
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
            _DEPTH[key] = 1
            try:
                yield False
            finally:
                _DEPTH[key] = 0
                try:
                    os.ftruncate(fd, 0)  # no stale pid for the next one to report
                except OSError:
                    pass
        finally:
            os.close(fd)
    finally:
        rlock.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- exchange ------------------------------------------------------------------------------------------------------

_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_libc = None


def _renameat2(a: Path, b: Path, flags: int) -> None:
    """renameat2(2); raises NotImplementedError where the system or filesystem cannot do it."""
    global _libc
    if os.environ.get("MPT_EXPORT_NO_EXCHANGE") or not sys.platform.startswith("linux"):
        raise NotImplementedError
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(_libc, "renameat2", None)
    if fn is None:
        raise NotImplementedError
    AT_FDCWD = -100
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), flags) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise NotImplementedError
        raise OSError(err, os.strerror(err), str(a))


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def _sigint_deferred():
    """Hold a Ctrl-C until the block is done (main thread only), so a commit is all-or-nothing for the user."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = signal.signal(signal.SIGINT, lambda *a: got.append(1))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
        if got:
            raise KeyboardInterrupt


# -- retiring old copies, recovery, stale temporaries --------------------------------------------------------------

def retire(old: Path, rename_to: Path | None = None) -> bool:
    """Delete a replaced or abandoned directory of ours unless someone holds it (a reader's shared flock, a live
    writer's exclusive one). ``rename_to`` (an ``-old-`` name) is applied first, under our lock, so that a deletion
    killed half-way leaves a name the next write recognises. -> True if deleted."""
    import fcntl

    try:
        fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return not os.path.lexists(old)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use; a later write removes it
        except OSError:
            pass
        if rename_to is not None:
            os.rename(old, rename_to)
            old = rename_to
        fault_point("retire: locked")
        try:  # tombstone first: a reader that opened this directory before the swap sees no manifest and reopens
            os.unlink("manifest.json", dir_fd=fd)
        except OSError:
            pass
        _rmtree(old)
        return not os.path.lexists(old)
    finally:
        os.close(fd)


def clean_stale(out: Path) -> None:
    """Remove what killed or interrupted writers of ``out`` left beside it (caller holds the writer lock):
    unfinished staging directories, old copies, and swap copies whose second rename happened."""
    for p in _siblings(out, "tmp"):
        if p.is_dir() and not p.is_symlink():
            retire(p, rename_to=_temp_name(out, "old"))
    for p in _siblings(out, "old"):
        if p.is_dir() and not p.is_symlink():
            retire(p)
    if os.path.lexists(out):
        for p in _siblings(out, "swap"):
            if p.is_dir() and not p.is_symlink():
                retire(p)


def recover(out: Path, wait_s: float = 30.0) -> bool:
    """If ``out`` is missing because a writer without atomic exchange was killed between its two renames, put the
    old copy back. A swap copy counts only while the staging directory it pairs with still exists (the second
    rename never happened); waits while a live writer holds the lock. -> True if ``out`` exists now."""
    out = Path(out)
    if os.path.lexists(out):
        return True

    def pending():
        return [s for s in _siblings(out, "swap") if _temp_name(out, "tmp", _staging_id(s)).is_dir()]

    if not pending():
        return False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            with writer_lock(out, timeout=0):
                if not os.path.lexists(out):
                    swaps = pending()
                    if swaps:
                        os.rename(swaps[-1], out)
                return os.path.lexists(out)
        except OutputExistsError:  # a writer is mid-swap (or the parent is read-only)
            if os.path.lexists(out):
                return True
            if time.monotonic() >= deadline or not os.access(out.parent, os.W_OK):
                return False
            time.sleep(0.05)


# -- the writer ----------------------------------------------------------------------------------------------------

def resolve_output(out: str | Path) -> Path:
    """The real path a write of ``out`` goes to (symbolic links and ``..`` resolved as the kernel resolves them)."""
    return Path(os.path.realpath(out))


@contextmanager
def staging(out: Path):
    """A fresh ``.<name>.mpt-export-tmp-*`` directory beside ``out``, marked and exclusively locked while this
    process writes it (so another writer's clean-up leaves it alone), removed unless the caller commits it
    (yields [tmp, state])."""
    import fcntl

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{TAG}-tmp-", dir=out.parent))
    except OSError as e:
        raise OutputExistsError(f"cannot write in {out.parent} ({e.strerror})") from None
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    state = {"committed": False, "fd": fd}
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            pass
        (tmp / STAGING_MARKER).write_text(f"{os.getpid()}\n")
        yield tmp, state
    finally:
        if state["fd"] is not None:
            os.close(state["fd"])
        if not state["committed"] and tmp.exists():
            gone = _temp_name(out, "old")  # a removal killed half-way leaves a name the next write recognises
            try:
                os.rename(tmp, gone)
            except OSError:
                gone = tmp
            _rmtree(gone)


@contextmanager
def replace_dir(out: str | Path, kind: str, force: bool = False, inputs=(), allow_replace: bool = False,
                hold_lock: bool = False):
    """Yield a staging directory beside ``out``; when the block succeeds it replaces ``out`` atomically (see the
    module docstring). ``inputs``: (label, path) pairs the output must not be, hold or lie inside. The writer lock
    is taken to clean up and to commit; ``hold_lock`` keeps it for the whole block (read-modify-write)."""
    check_path_text(Path(out))
    out = resolve_output(out)
    check_replaceable(out, kind, force, inputs, allow_replace)  # fail early, before taking locks or doing work
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputExistsError(f"cannot create {out.parent} ({e.strerror})") from None
    entry = {"path": str(out), "state": "staging"}
    with writer_lock(out) as nested:
        if not nested:
            recover(out, wait_s=0)
            clean_stale(out)
        check_replaceable(out, kind, force, inputs, allow_replace)
    with staging(out) as (tmp, state):
        WRITES.append(entry)
        fault_point("staging created")
        if hold_lock:
            with writer_lock(out):
                yield tmp
                _commit(tmp, out, kind, force, inputs, allow_replace, entry, state)
        else:
            yield tmp
            with writer_lock(out):
                _commit(tmp, out, kind, force, inputs, allow_replace, entry, state)


def _commit(tmp: Path, out: Path, kind, force, inputs, allow_replace, entry: dict, state: dict) -> None:
    """Under the writer lock: swap the finished staging directory in, then retire the old copy. Ctrl-C waits until
    this is done, so the user is told exactly what happened."""
    fault_point("staging written")
    check_replaceable(out, kind, force, inputs, allow_replace)  # what is there now (another writer may have run)
    _finish_permissions(tmp)
    _fsync_tree(tmp)
    with _sigint_deferred():
        (tmp / STAGING_MARKER).unlink()
        fault_point("marker removed")
        os.close(state["fd"])  # our lock on it: readers of the new bundle must not wait for us
        state["fd"] = None
        old = _swap_in(tmp, out)
        state["committed"] = True
        entry["state"] = "committed"
        fault_point("swapped")
        _fsync_dir(out.parent)
        if old is not None:
            retired = _temp_name(out, "old")
            try:
                os.rename(old, retired)
                fault_point("old renamed")
                retire(retired)
            except OSError:
                pass


def _swap_in(tmp: Path, out: Path) -> Path | None:
    """Put ``tmp`` at ``out``. -> where the previous ``out`` now is (None if there was none)."""
    if not os.path.lexists(out):
        try:
            _renameat2(tmp, out, _RENAME_NOREPLACE)
        except NotImplementedError:
            os.rename(tmp, out)
        return None
    try:
        _renameat2(tmp, out, _RENAME_EXCHANGE)  # one step: out holds the new directory, tmp the old one
        return tmp
    except NotImplementedError:
        pass
    away = _temp_name(out, "swap", _staging_id(tmp))  # pairs with tmp: recoverable only while tmp exists
    os.rename(out, away)
    fault_point("between renames")
    os.rename(tmp, out)
    return away


def _finish_permissions(root: Path) -> None:
    """mkdtemp and some writers make owner-only files; give what we created ordinary permissions (hard links to an
    existing bundle's files already have them and are left alone, so their inodes do not change)."""
    umask = _umask()
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + [""]:
            p = os.path.join(dirpath, name) if name else dirpath
            want = 0o777 & ~umask
            if stat.S_IMODE(os.lstat(p).st_mode) != want:
                os.chmod(p, want)
        for name in files:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            want = 0o666 & ~umask
            if st.st_nlink == 1 and stat.S_IMODE(st.st_mode) != want:
                os.chmod(p, want)


def interrupted_message() -> str:
    """What an interrupted command tells the user about its outputs."""
    done = [w["path"] for w in WRITES if w["state"] == "committed"]
    pending = [w["path"] for w in WRITES if w["state"] != "committed"]
    parts = []
    if done:
        parts.append(f"{', '.join(done)} {'was' if len(done) == 1 else 'were'} written completely")
    if pending:
        parts.append(f"{', '.join(pending)} {'was' if len(pending) == 1 else 'were'} left as before "
                     "(its temporary files are removed by the next write)")
    return "; ".join(parts) if parts else "nothing was written"

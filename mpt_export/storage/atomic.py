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

import os
import re
import signal
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError
from .fsops import (RENAME_EXCHANGE, RENAME_NOREPLACE, fsync_dir, fsync_tree, renameat2, sigint_deferred, current_umask, writer_lock)
from .ownership import STAGING_MARKER, TAG, rmtree_ours, check_path_text, check_replaceable


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


def _staging_id(tmp: Path) -> str:
    return tmp.name.rsplit("-", 1)[1]


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
        rmtree_ours(old)
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
            rmtree_ours(gone)


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
    entry = {"path": str(out), "state": "staging", "existed": os.path.lexists(out)}
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
    fsync_tree(tmp)
    with sigint_deferred():
        (tmp / STAGING_MARKER).unlink()
        fault_point("marker removed")
        os.close(state["fd"])  # our lock on it: readers of the new bundle must not wait for us
        state["fd"] = None
        old = _swap_in(tmp, out)
        state["committed"] = True
        entry["state"] = "committed"
        fault_point("swapped")
        fsync_dir(out.parent)
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
            renameat2(tmp, out, RENAME_NOREPLACE)
        except NotImplementedError:
            os.rename(tmp, out)
        return None
    try:
        renameat2(tmp, out, RENAME_EXCHANGE)  # one step: out holds the new directory, tmp the old one
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
    umask = current_umask()
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
    """What an interrupted command tells the user about its outputs: each one written completely, as it was before,
    or not created."""
    parts = []
    for w in WRITES:
        if w["state"] == "committed":
            parts.append(f"{w['path']} was written completely")
        elif w.get("existed"):
            parts.append(f"{w['path']} is as it was before")
        else:
            parts.append(f"{w['path']} was not created")
    if any(w["state"] != "committed" for w in WRITES):
        parts.append("the next write removes any temporary files left")
    return "; ".join(parts) if parts else "nothing was written"

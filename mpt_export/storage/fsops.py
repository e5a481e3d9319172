"""Filesystem primitives for the writer in ``atomic.py``: the per-output writer lock (``flock`` on
``.<name>.mpt-export.lock`` beside the output, re-entrant within a thread), ``renameat2`` exchange, fsync of a tree,
and Ctrl-C held back while a commit happens."""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import stat
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError, OutputExistsError
from .ownership import TAG


def lock_timeout() -> float:
    raw = os.environ.get("MPT_EXPORT_LOCK_TIMEOUT", "10")
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 <= value < float("inf"):
        raise InputError(f"MPT_EXPORT_LOCK_TIMEOUT must be a number of seconds >= 0, got {raw!r}")
    return value


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
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666 & ~current_umask())
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


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- exchange ------------------------------------------------------------------------------------------------------

RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
_libc = None


def renameat2(a: Path, b: Path, flags: int) -> None:
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


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def fsync_dir(path: Path) -> None:
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
def sigint_deferred():
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

"""The bundle directory, read through one handle: the directory opened with a shared lock (:func:`open_dir`), a
file under it opened refusing symbolic links at every level (:func:`open_in`, :func:`read_in`), and the walk that
refuses a symbolic link anywhere inside it (:func:`refuse_links`). See :mod:`mpt_export.bundle.reader`."""

from __future__ import annotations

import errno
import os
import stat
import time
from pathlib import Path

from ..errors import BundleError
from .manifest import MANIFEST, REDO
from ..storage.atomic import recover


def open_in(dirfd: int, rel: str, display: str) -> int:
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
        raise BundleError(f"bundle file {rel} is missing from {display}; the bundle is incomplete — {REDO}") from None
    except NotADirectoryError:
        raise BundleError(f"bundle path {rel} in {display} is not laid out as a directory; {REDO}") from None
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a symbolic link
            raise BundleError(f"bundle file {rel} in {display} is a symbolic link; bundles hold plain files only "
                              f"(links could point outside it) — {REDO}") from None
        raise BundleError(f"cannot read bundle file {rel} in {display} ({e.strerror}); check its permissions") from None
    finally:
        for o in opened:
            os.close(o)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BundleError(f"bundle file {rel} in {display} is not a regular file; {REDO}")
    return fd


MAX_DEPTH = 32  # directories inside a bundle: ours go one level deep (tokenizer/)


def refuse_links(dirfd: int, path: Path, prefix: str = "", depth: int = 0) -> None:
    """A symbolic link anywhere inside the bundle is refused, whether the manifest lists it or not, to a file or a
    directory, dangling or not: bundles hold plain files only (a link is copied as a link, may point outside the
    bundle, and can be changed without changing any file the manifest hashes). Links are never followed here."""
    if depth > MAX_DEPTH:
        raise BundleError(f"bundle {path} has directories nested more than {MAX_DEPTH} deep ({prefix.rstrip('/')}); "
                          f"it is not a bundle mpt-export wrote — {REDO}")
    try:
        names = sorted(os.listdir(dirfd))
    except OSError as e:
        raise BundleError(f"cannot list {(prefix.rstrip('/') or '.')} in bundle {path} ({e.strerror}); check its "
                          "permissions") from None
    for name in names:
        rel = prefix + name
        try:
            st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone meanwhile: nothing to follow
        except OSError as e:
            raise BundleError(f"cannot read {rel} in bundle {path} ({e.strerror}); check its permissions") from None
        if stat.S_ISLNK(st.st_mode):
            try:
                target = f" (pointing to {os.readlink(name, dir_fd=dirfd)})"
            except OSError:
                target = ""
            raise BundleError(f"{rel} in bundle {path} is a symbolic link{target}; bundles hold plain files only and "
                              "every link in one is refused (it could point outside the bundle) — replace it with the "
                              "file itself (`cp -rL` copies a bundle that way) or remove it, or re-export the bundle")
        if stat.S_ISDIR(st.st_mode):
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise BundleError(f"cannot open {rel} in bundle {path} ({e.strerror}); check its permissions") from None
            try:
                refuse_links(sub, path, rel + "/", depth + 1)
            finally:
                os.close(sub)


def open_dir(path: Path) -> int:
    """A descriptor of the bundle directory with a shared lock (writers delete an old copy only when no reader holds
    it). A directory retired between our open and our lock has no manifest (the writer removes it first): reopen."""
    import fcntl

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
            names = set(os.listdir(fd))
            os.close(fd)
            if "adapter_config.json" in names:  # a PEFT adapter (save_pretrained) where a bundle was expected
                raise BundleError(f"{path} is a PEFT adapter, not a bundle: export it first — `mpt-export export "
                                  f"--base-model BASE --adapter NAME1,NAME2={path} --out BUNDLE` — and pass the "
                                  "bundle") from None
            if "config.json" in names:  # a base model
                raise BundleError(f"{path} is a model directory, not a bundle: export it with its MPT adapters first "
                                  f"(`mpt-export export --base-model {path} --adapter NAMES=ADAPTER --out BUNDLE`)") \
                    from None
            raise BundleError(f"{path} has no {MANIFEST}; it is not an mpt-export bundle (or its export did not "
                              "finish)") from None
        except OSError as e:
            os.close(fd)
            raise BundleError(f"cannot read {path} ({e.strerror})") from None
    raise BundleError(f"bundle {path} kept changing while it was opened; try again")


def read_in(dirfd: int, rel: str, path: Path) -> bytes:
    """A bundle file's bytes, read through the bundle's directory handle."""
    fd = open_in(dirfd, rel, str(path))
    try:
        with os.fdopen(fd, "rb") as f:
            return f.read()
    except OSError as e:
        raise BundleError(f"cannot read {path / rel} ({e.strerror}); check its permissions") from None

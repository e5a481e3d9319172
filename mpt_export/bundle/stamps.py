"""Verification stamps: a record, kept outside the bundle, that the files of one bundle directory were hashed and
matched their manifest — so later opens of the same, unchanged files skip re-hashing gigabytes.

A stamp is keyed by the manifest's own digest and the bundle directory's (device, inode), and holds per file its
expected sha256 and the (size, mtime_ns, ctime_ns, inode, device) it had when it was hashed. An open trusts a file
only when all five still match. Any write to a file changes its ctime, which no user call can set back (``touch``
and ``cp -a`` restore mtime, never ctime; a copy also has a new inode), so a file changed or copied since its
stamp is hashed again, and a changed byte is refused. What a stamp cannot see is a change that bypasses the
filesystem (a failing disk, a raw block write): ``mpt-export verify`` always hashes every file.

Files whose ctime is within ``FRESH_S`` of the hashing are not stamped: a filesystem keeps timestamps at the
granularity of its clock tick, and a write in the same tick as the hash would leave ctime unchanged. So an export
(whose files are seconds old) is hashed again by its first open; later opens use the stamp.

Location: ``$MPT_EXPORT_CACHE/verified`` (default ``$XDG_CACHE_HOME/mpt-export``, else ``~/.cache/mpt-export``);
``MPT_EXPORT_CACHE=off`` disables stamps (every open hashes). A cache that cannot be written is ignored. Stamps
are for accidents, not adversaries: whoever can write your cache directory can also write your bundles.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

CACHE_ENV = "MPT_EXPORT_CACHE"
FRESH_S = 2.0
KEEP = 512  # stamps kept; the oldest beyond this are removed when a new one is written
_NAME_LEN = 40


def cache_root() -> Path | None:
    """The tool's cache directory, or None when caching is off."""
    v = os.environ.get(CACHE_ENV)
    if v is not None:
        if v.strip().lower() in ("", "0", "off", "no", "none", "false"):
            return None
        return Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpt-export"


def file_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _path(dir_stat: os.stat_result, manifest_digest: str) -> Path | None:
    root = cache_root()
    if root is None:
        return None
    name = hashlib.sha256(f"{manifest_digest}:{dir_stat.st_dev}:{dir_stat.st_ino}".encode()).hexdigest()
    return root / "verified" / f"{name[:_NAME_LEN]}.json"


def read(dir_stat: os.stat_result, manifest_digest: str) -> dict[str, list]:
    """rel -> [sha256, size, mtime_ns, ctime_ns, inode, device] for the files this directory's stamp vouches for
    ({} when there is none or it is unreadable)."""
    p = _path(dir_stat, manifest_digest)
    if p is None:
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("manifest_sha256") != manifest_digest:
        return {}
    files = data.get("files")
    return files if isinstance(files, dict) else {}


def trusted(stamp: dict, rel: str, digest: str, st: os.stat_result) -> bool:
    entry = stamp.get(rel)
    return isinstance(entry, list) and entry == [digest, *file_key(st)]


def stampable(st: os.stat_result, hashed_at_ns: int) -> bool:
    """A file whose last change is older than its hashing by more than a clock tick could hide."""
    return max(st.st_ctime_ns, st.st_mtime_ns) < hashed_at_ns - int(FRESH_S * 1e9)


def write(dir_stat: os.stat_result, manifest_digest: str, files: dict[str, list]) -> bool:
    """Record ``files`` (rel -> [sha256, *file_key]) for this directory; -> whether a stamp was written. Never
    raises: a cache that cannot be written only means the next open hashes again."""
    p = _path(dir_stat, manifest_digest)
    if p is None or not files:
        return False
    body = json.dumps({"manifest_sha256": manifest_digest, "stamped_at": time.time(), "files": files},
                      sort_keys=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(body)
        os.replace(tmp, p)
    except OSError:
        try:
            tmp.unlink()
        except OSError:
            pass
        return False
    _prune(p.parent)
    return True


def _prune(folder: Path) -> None:
    """Keep the newest ``KEEP`` stamps (only files named as this module names them)."""
    try:
        ours = [f for f in folder.iterdir() if f.suffix == ".json" and len(f.stem) == _NAME_LEN
                and all(c in "0123456789abcdef" for c in f.stem)]
        if len(ours) <= KEEP:
            return
        ours.sort(key=lambda f: f.stat().st_mtime_ns)
        for f in ours[:len(ours) - KEEP]:
            f.unlink()
    except OSError:
        pass

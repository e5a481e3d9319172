"""Resident memory of this process (for the manifest's export figures and the benches), and handing freed memory
back to the system."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from pathlib import Path


def _proc_kb(path: str, key: str) -> int | None:
    """A ``Key:  N kB`` figure from a /proc file, in bytes; None off Linux or when the key is missing."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def status_bytes(key: str) -> int | None:
    """A memory figure from ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: the peak), in bytes; None off Linux."""
    return _proc_kb("/proc/self/status", key)


def available_memory() -> int | None:
    """``MemAvailable`` from /proc/meminfo (bytes): what can be allocated without swapping, page cache included;
    None where the system does not say."""
    return _proc_kb("/proc/meminfo", "MemAvailable")


def rss_mib() -> float:
    """Resident memory now, MiB (0 where /proc is missing)."""
    return round((status_bytes("VmRSS") or 0) / 2**20, 1)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB: ``VmHWM`` (this program's own, since its exec).
    ``ru_maxrss`` is only the fallback off Linux: Linux carries it across exec, so a command started by a large
    process (a test runner, a notebook) would report that process's peak as its own."""
    hwm = status_bytes("VmHWM")
    if hwm is not None:
        return round(hwm / 2**20, 1)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc; empty off Linux)."""
    children: dict[int, list[int]] = {}
    try:
        names = [n for n in Path("/proc").iterdir() if n.name.isdigit()]
    except OSError:
        return set()
    for d in names:
        try:
            ppid = int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out


def tree_peak_bytes(pid: int) -> int:
    """The largest ``VmHWM`` among ``pid`` and its descendants now (0 off Linux)."""
    return max((_proc_kb(f"/proc/{p}/status", "VmHWM") or 0 for p in {pid} | descendants(pid)), default=0)


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps freed heap pages otherwise, so the next big
    allocation would add to the peak instead of reusing them)."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

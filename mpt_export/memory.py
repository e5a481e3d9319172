"""Resident memory of this process (for the manifest's export figures and the benches), and handing freed memory
back to the system."""

from __future__ import annotations

from pathlib import Path


def status_bytes(key: str) -> int | None:
    """A memory figure from ``/proc/self/status`` (``VmRSS``: now, ``VmHWM``: the peak), in bytes; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_mib() -> float:
    """Resident memory now, MiB (0 where /proc is missing)."""
    return round((status_bytes("VmRSS") or 0) / 2**20, 1)


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


def release_freed_memory() -> None:
    """Hand memory freed by Python/torch back to the OS (glibc keeps freed heap pages otherwise, so the next big
    allocation would add to the peak instead of reusing them)."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass

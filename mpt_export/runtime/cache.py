"""The session's caches of task prompts and prompt keys/values: thread-safe, keyed by content, bounded in entries
and in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict


def nbytes(value) -> int:
    """The bytes an entry holds: an array, or a list/tuple/dict of them (a task's prompt keys/values)."""
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return int(getattr(value, "nbytes", 0))


class LRU:
    """A thread-safe LRU keyed by task digest (content hash: a changed task never hits a stale entry), holding at
    most ``size`` entries (None: any number) and ``max_bytes`` bytes (None: any); an entry larger than the whole
    budget is not kept. With uniform use of N tasks, the hit rate is what it can be: the entries kept / N."""

    def __init__(self, size: int | None, max_bytes: int | None = None):
        self.size, self.max_bytes = size, max_bytes
        self._d, self._lock = OrderedDict(), threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0  # since the session opened (what /metrics reports)

    def get(self, key):
        with self._lock:
            hit = self._d.get(key)
            if hit is not None:
                self._d.move_to_end(key)
                self.hits += 1
                return hit[0]
            self.misses += 1
            return None

    def put(self, key, value):
        n = nbytes(value)
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if (self.max_bytes is not None and n > self.max_bytes) or self.size == 0:
                return
            self._d[key] = (value, n)
            self.bytes += n
            while self._d and ((self.size is not None and len(self._d) > self.size)
                               or (self.max_bytes is not None and self.bytes > self.max_bytes)):
                _, (_, gone) = self._d.popitem(last=False)
                self.bytes -= gone
                self.evictions += 1

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self._d),
                "size": self.size, "bytes": self.bytes, "max_bytes": self.max_bytes}

    def __len__(self):
        return len(self._d)

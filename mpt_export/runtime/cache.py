"""The session's caches of task prompts and prompt keys/values: small, thread-safe, keyed by content."""

from __future__ import annotations

import threading
from collections import OrderedDict


class LRU:
    """A small thread-safe LRU keyed by task digest (content hash: a changed task never hits a stale entry)."""

    def __init__(self, size: int):
        self.size, self._d, self._lock = size, OrderedDict(), threading.Lock()
        self.hits = self.misses = self.evictions = 0  # since the session opened (what /metrics reports)

    def get(self, key):
        with self._lock:
            v = self._d.get(key)
            if v is not None:
                self._d.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return v

    def put(self, key, value):
        with self._lock:
            self._d[key] = value
            self._d.move_to_end(key)
            while len(self._d) > max(self.size, 0):
                self._d.popitem(last=False)
                self.evictions += 1

    def stats(self) -> dict:
        return {"hits": self.hits, "misses": self.misses, "evictions": self.evictions, "entries": len(self._d),
                "size": self.size}

    def __len__(self):
        return len(self._d)

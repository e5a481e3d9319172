"""Child processes the benches start: their stderr drained, and stopped by process id (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading


def drain_stderr(proc) -> None:
    """Keep reading a child's stderr so it never blocks on a full pipe."""
    threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()


def stop(proc, timeout: float = 120) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

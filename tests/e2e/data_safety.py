"""What the data-safety modules (test_data_safety_*.py) share: the console script run with extra environment and a
timeout, the temporary and old copies a write left beside a bundle, and the llama case's task names."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

from support import EXE

OLD = ["a", "b", "c", "t"]


def leftovers(bundle: Path) -> list[str]:
    return sorted(p.name for p in bundle.parent.iterdir()
                  if p.name.startswith(f".{bundle.name}.") and not p.name.endswith(".lock"))


def cli(*args, env=None, timeout=300):
    """The console script as a user runs it: Ctrl-C (SIGINT) delivered, even where the tests themselves run in the
    background (a shell starts background jobs with SIGINT ignored, and the child would inherit that)."""
    return subprocess.run([str(EXE), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200", **(env or {})},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

"""What the serving modules (test_serving_*.py) share: `mpt-export serve` as a process the test that started it
owns (:class:`Server`, :func:`server`), its API key and the prompts. Imported only by modules that checked for
httpx, openai, starlette and uvicorn first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from contextlib import contextmanager

import httpx
import openai

from support import EXE

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Server:
    """A `mpt-export serve` process owned by the test that started it (stopped by its pid)."""

    def __init__(self, bundle, *args, env=None, argv=None, cwd=None):
        """``mpt-export serve BUNDLE --port 0 ARGS``; or ``argv`` as given (a command line from the docs, its
        ``--port 0`` included), run in ``cwd``."""
        argv = argv or [str(EXE), "serve", str(bundle), "--port", "0", *map(str, args)]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 60
        self.port = None
        while self.port is None:
            m = next((re.search(r"listening on http://127\.0\.0\.1:(\d+)", x) for x in self.lines if "listening" in x), None)
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {self.lines}")
            else:
                time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"server not ready: {self.lines}")

    def log(self, last: int = 40) -> str:
        return "\n".join(self.lines[-last:])

    def client(self, key=KEY, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60, **kw)

    def steps(self, key=KEY):
        return httpx.get(self.url + "/admin/steps", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()

    def stop(self, timeout=60) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


@contextmanager
def server(bundle, *args, env=None, ready=True):
    s = Server(bundle, *args, env=env)
    try:
        yield s.wait_ready() if ready else s
    finally:
        if s.proc.poll() is None:
            os.kill(s.proc.pid, signal.SIGKILL)
            s.proc.wait()


PROMPTS = ["the movie was", "the premise clearly", "the station is next to", "one frozen backbone",
           "does the premise entail", "prompt tuning learns"]

"""What the Ray module (test_ray.py) uses: `mpt-export serve --ray` as a process this
test run owns (:class:`RayServer`), its prompts and a completion that says which replica answered. Imported only by
modules that checked for the ray extra, httpx and openai first."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time

import httpx
import pytest
import openai

from mpt_export.runtime.memory import descendants
from support import EXE

KEY = "ray-key-1"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayServer:
    """`mpt-export serve --ray` owned by this test: started here, stopped by pid, its process tree checked."""

    def __init__(self, bundle, *args):
        self.tmp = tempfile.mkdtemp(prefix="mptray", dir="/tmp")  # Ray's socket paths must stay short
        self.port = free_port()
        env = {**os.environ, "RAY_TMPDIR": self.tmp, "RAY_USAGE_STATS_ENABLED": "0"}
        self.proc = subprocess.Popen([str(EXE), "serve", str(bundle), "--ray", "--port", str(self.port),
                                      "--api-key", KEY, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self.tree: set[int] = set()  # filled once it started; kill() may run before that
        threading.Thread(target=self._read, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 240
        while not any("serving " in x for x in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"the Ray server did not start: {self.lines[-20:]}")
            time.sleep(0.1)
        self.tree = descendants(self.proc.pid)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def health(self) -> dict:
        r = httpx.get(self.url + "/health", timeout=30)
        return {**r.json(), "status_code": r.status_code}

    def replicas(self, want: int = 2, tries: int = 500) -> dict[str, dict]:
        """replica id -> its /health, until ``want`` replicas answered (bounded in count)."""
        seen: dict[str, dict] = {}
        for _ in range(tries):
            if len(seen) >= want:
                break
            h = self.health()
            seen[h["replica"]] = h
        return seen

    def models_by_replica(self, want: int = 2, tries: int = 500) -> dict[str, list]:
        """replica id (X-Mpt-Export-Replica) -> the /v1/models body it answered, until ``want`` replicas answered."""
        seen: dict[str, list] = {}
        for _ in range(tries):
            if len(seen) >= want:
                break
            r = httpx.get(self.url + "/v1/models", headers=AUTH, timeout=30)
            assert r.status_code == 200, r.text
            seen.setdefault(r.headers["x-mpt-export-replica"], []).append(r.json())
        return seen

    def wait_line(self, text: str, after: int, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[after:]:
                if text in line:
                    return line
            time.sleep(0.1)
        raise AssertionError(f"no {text!r} in the server's output within {timeout:g} s: {self.lines[after:][-10:]}")

    def stop(self, timeout=90):
        """SIGTERM to the server (it deletes the app and shuts down the Ray it started); then every process it
        had below it must be gone. Survivors are killed by pid and reported."""
        self.tree |= descendants(self.proc.pid)
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        deadline = time.monotonic() + 20
        while any(alive(p) for p in self.tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = sorted(p for p in self.tree if alive(p))
        self.kill(cleanup=False)
        return rc, left

    def kill(self, cleanup: bool = True):
        for p in [self.proc.pid, *sorted(self.tree | descendants(self.proc.pid))]:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        if cleanup:
            shutil.rmtree(self.tmp, ignore_errors=True)


PROMPTS = ["the cat sat", "once upon a time", "hello", "a b c d e f", "good morning to", "it was"]


def complete(client, task, prompt, max_tokens=6):
    raw = client.completions.with_raw_response.create(model=task, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return raw.parse().choices[0].text, raw.headers.get("x-mpt-export-replica")


# -- the run's one server, as the Ray test modules name it (they import these fixtures) ---------------------

@pytest.fixture
def case(ray_case):
    """The run's Ray bundle copy and offline results (tests/e2e/conftest.py)."""
    return ray_case


@pytest.fixture
def srv(ray_srv):
    """The run's one Ray server (tests/e2e/conftest.py)."""
    return ray_srv

"""`mpt-export serve --ray`, for real: a local Ray instance started by the server process this test launches (2 CPU
replicas), driven over Serve's HTTP proxy by the official `openai` client. Every Ray process is a descendant of that
server process; the test stops it by pid and checks that none is left (never `ray stop`, which stops by name)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import importlib.util  # noqa: E402

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
    # found, not imported: Ray in the test runner's own process would only make it bigger
    pytest.skip("needs the ray extra (pip install 'mpt-export[ray]'; make test installs it)", allow_module_level=True)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import mpt_export  # noqa: E402
from mpt_export.memory import descendants  # noqa: E402

pytestmark = pytest.mark.ray
EXE = Path(sys.executable).with_name("mpt-export")
KEY = "ray-key-1"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    import socket

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

    def stop(self, timeout=90) -> int:
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
        self.kill()
        return rc, left

    def kill(self):
        for p in [self.proc.pid, *sorted(self.tree | descendants(self.proc.pid))]:
            if alive(p):
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)


PROMPTS = ["the cat sat", "once upon a time", "hello", "a b c d e f", "good morning to", "it was"]


def complete(client, task, prompt, max_tokens=6):
    raw = client.completions.with_raw_response.create(model=task, prompt=prompt, max_tokens=max_tokens, temperature=0)
    return raw.parse().choices[0].text, raw.headers.get("x-mpt-export-replica")


def test_ray_replicas_mixed_tasks_replacement(llama):
    bundle = llama.bundle
    b = mpt_export.load_bundle(bundle)
    tasks = b.tasks
    s = b.session()
    jobs = [(tasks[i % len(tasks)], PROMPTS[i % len(PROMPTS)]) for i in range(24)]
    extra = [(tasks[1], PROMPTS[0]), (tasks[2], PROMPTS[1])]  # the streamed and the after-the-kill requests
    want = {(t, p): s.generate([p], [t], max_new_tokens=6)[0] for t, p in set(jobs) | set(extra)}
    s.close()
    b.close()

    srv = RayServer(bundle, "--replicas", "2", "--threads", "1", "--max-batch", "4")
    try:
        client = srv.client()
        assert [m.id for m in client.models.list().data] == tasks
        # concurrent, mixed tasks: each equals its offline result, and both replicas answered
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda j: complete(client, *j), jobs))
        for (t, p), (text, _) in zip(jobs, got):
            assert text == want[(t, p)], (t, p)
        replicas = {r for _, r in got}
        assert len(replicas) == 2 and None not in replicas, replicas
        # streaming goes through Serve's proxy too
        stream = client.completions.create(model=tasks[1], prompt=PROMPTS[0], max_tokens=6, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == want[(tasks[1], PROMPTS[0])]
        # errors stay OpenAI-shaped behind the proxy
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        assert "nope" in str(e.value) and tasks[0] in str(e.value)

        # kill one replica's process: Serve replaces it, requests after the kill succeed
        pids = {}
        for _ in range(500):
            if len(pids) == 2:
                break
            h = srv.health()
            pids[h["replica"]] = h["pid"]
        assert len(pids) == 2, pids
        victim, pid = sorted(pids.items())[0]
        assert pid in descendants(srv.proc.pid)  # a process of this test's server, nobody else's
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        after, seen = [], set()
        deadline = t_kill + 120
        for _ in range(5000):  # bounded in count and in time
            if time.monotonic() > deadline:
                break
            text, rep = complete(client, tasks[2], PROMPTS[1])
            after.append(text)
            seen.add(rep)
            if any(r not in pids for r in seen) and len(seen - {victim}) == 2:
                break
        replaced = time.monotonic() - t_kill
        assert victim not in seen, "a request was answered by the killed replica"
        assert len(seen) == 2 and any(r not in pids for r in seen), f"no replacement replica within 120 s: {seen}"
        assert set(after) == {want[(tasks[2], PROMPTS[1])]}
        print(f"\nray: replica replaced in {replaced:.1f} s ({len(after)} requests served meanwhile, none failed)")
    finally:
        rc, left = srv.stop()
    assert rc == 0, srv.lines[-20:]
    assert not left, f"Ray processes left running after the server stopped: {left}"


def test_ray_cli_errors(tmp_path):
    """Bad --ray options: one line, exit 1, no Ray started."""
    from conftest import run_cli

    from mpt_export.errors import InputError

    r = run_cli("serve", tmp_path / "nope", "--ray")
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    r = run_cli("serve", tmp_path, "--replicas", "2")
    assert r.returncode == 1 and "--ray" in r.stdout + r.stderr
    for bad in ("3", "a:b", "4:2", "0:0"):
        from mpt_export.serving.ray_serve import parse_autoscale

        with pytest.raises(InputError, match="MIN:MAX"):
            parse_autoscale(bad)
    assert parse_autoscale("1:4") == (1, 4)

"""The server, for real: `mpt-export serve` on 127.0.0.1 (a free port), driven by the official `openai` client and
httpx; results compared with the library's own offline generation. This module: a server's life, each check with a
server of its own — a full queue answers 429 and the server recovers, SIGTERM drains a request in flight, /health
while loading, reload (by request and by SIGHUP) and a changed backbone refused."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import mpt_export  # noqa: E402
from servers import AUTH, KEY, PROMPTS, server  # noqa: E402
from support import EXE  # noqa: E402


def test_queue_full_is_429_and_the_server_recovers(served):
    with server(served["bundle"], "--max-batch", "1", "--max-queue", "1") as s:
        c = s.client()
        busy = c.completions.create(model="sst2", prompt="the movie was", max_tokens=480, temperature=0,
                                    stream=True)  # long enough to outlast the probe on a loaded machine
        it = iter(busy)
        next(it)  # the only row is busy
        waiting = threading.Thread(target=lambda: c.completions.create(model="mnli", prompt="x y", max_tokens=2,
                                                                       temperature=0))
        waiting.start()  # fills the queue of one
        deadline = time.monotonic() + 10
        while "mpt_export_queue_depth 1.0" not in httpx.get(s.url + "/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with ThreadPoolExecutor(6) as ex:  # several at once: the busy row may finish early on a loaded machine
            probes = list(ex.map(lambda _: httpx.post(s.url + "/v1/completions", timeout=60, json={
                "model": "qnli", "prompt": "z", "max_tokens": 2}), range(6)))
        r = next((p for p in probes if p.status_code == 429), None)
        assert r is not None and r.headers["retry-after"] == "1", [p.status_code for p in probes]
        assert r.json()["error"]["code"] == "queue_full"
        assert all(p.status_code in (200, 429) for p in probes)
        list(it)
        waiting.join(timeout=60)
        r = c.completions.create(model="qnli", prompt="z", max_tokens=2, temperature=0)  # healthy afterwards
        assert r.choices[0].finish_reason in ("stop", "length")
        assert s.stop() == 0


def test_sigterm_drains_a_request_in_flight(served, offline):
    with server(served["bundle"], "--drain-timeout", "60") as s:
        c = s.client()
        out = {}

        def run():
            out["text"] = c.completions.create(model="rte", prompt=PROMPTS[0], max_tokens=250, temperature=0
                                               ).choices[0].text

        t = threading.Thread(target=run)
        t.start()
        deadline = time.monotonic() + 30
        while "mpt_export_running_batch_size 1.0" not in httpx.get(s.url + "/metrics", headers=AUTH).text:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(s.proc.pid, signal.SIGTERM)
        t.join(timeout=60)
        assert s.proc.wait(timeout=60) == 0
        assert out["text"] == offline("rte", PROMPTS[0], 250)
        assert any("draining" in x for x in s.lines)


def test_health_while_loading_and_reload(served, tmp_path):
    import shutil

    b = tmp_path / "bundle"
    shutil.copytree(served["bundle"], b)
    with server(b, "--api-key", KEY, env={"MPT_EXPORT_SERVE_LOAD_DELAY": "1.5"}, ready=False) as s:
        r = httpx.get(s.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = httpx.get(s.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "loading"
        s.wait_ready()
        c = s.client()
        # a task added on disk appears after a reload, while a request is in flight
        stream = c.completions.create(model="sst2", prompt="the movie was", max_tokens=120, temperature=0, stream=True)
        it = iter(stream)
        first = next(it).choices[0].text
        res = subprocess.run([str(EXE), "tasks", "add", str(b), "--adapter", f"fresh={served['target']}"],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        r = httpx.post(s.url + "/admin/reload", json={}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.json()["added"] == ["fresh"]
        assert "fresh" in [m.id for m in c.models.list().data]
        assert first + "".join(ch.choices[0].text for ch in it) == \
            mpt_export.load_bundle(b).session().generate(["the movie was"], ["sst2"], max_new_tokens=120)[0]
        r = c.completions.create(model="fresh", prompt="the plot", max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length")
        # SIGHUP reloads too
        subprocess.run([str(EXE), "tasks", "remove", str(b), "fresh"], check=True, capture_output=True, timeout=120)
        os.kill(s.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while "fresh" in [m.id for m in c.models.list().data]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # a changed backbone is not reloaded
        mpt_export.export_bundle(served["base"], [f"sst2,mnli,qnli={served['root'] / 'src'}"], b, force=True,
                                 dtype="fp16", validate=False).close()
        r = httpx.post(s.url + "/admin/reload", json={}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "restart_required"
        assert c.completions.create(model="rte", prompt="x y", max_tokens=2, temperature=0).choices
        assert s.stop() == 0


def test_the_server_opens_the_bundle_once_and_verifies_that_one(served, offline, tmp_path):
    """The server opens the bundle once (before it listens) and verifies and serves that same directory: moved
    away while it loads and replaced at its path by a tampered copy, it is still what the server serves — the path
    was never opened again. Given the tampered copy itself, the server refuses it with one error line and exit 1."""
    import json
    import shutil

    b, tampered = tmp_path / "bundle", tmp_path / "tampered"
    shutil.copytree(served["bundle"], b)
    shutil.copytree(served["bundle"], tampered)
    victim = next(f for f in sorted(json.loads((tampered / "manifest.json").read_text())["files"])
                  if f.startswith("tokenizer/"))
    with open(tampered / victim, "a") as f:
        f.write(" ")
    with server(tampered, env={"MPT_EXPORT_SERVE_LOAD_DELAY": "0.5"}, ready=False) as s:
        assert s.proc.wait(timeout=60) == 1
        s._reader.join(timeout=10)
        errors = [line for line in s.lines if line.startswith("error:")]
        assert len(errors) == 1 and f"bundle file {victim} does not match its sha256" in errors[0], s.log()
    with server(b, env={"MPT_EXPORT_SERVE_LOAD_DELAY": "2"}, ready=False) as s:
        b.rename(tmp_path / "moved")
        shutil.copytree(tampered, b)  # what the path names now would be refused
        s.wait_ready()
        r = s.client().completions.create(model="sst2", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].text == offline("sst2", PROMPTS[0], 6)
        assert not [line for line in s.lines if "error" in line], s.log()
        assert s.stop() == 0


def _flip_a_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def test_a_bundle_that_fails_to_load_is_a_failed_state(served, offline, tmp_path):
    """A task bank with one byte flipped: at the first load the server says why on one line and exits 1 (no
    traceback, never "loading" for ever); flipped between start and a reload, the reload is refused (409
    reload_failed naming the file, OpenAI-shaped; SIGHUP: one log line) and the server goes on serving the bundle it
    has."""
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(served["bundle"], bad)
    _flip_a_byte(bad / "tasks.safetensors")
    with server(bad, env={"MPT_EXPORT_SERVE_LOAD_DELAY": "1"}, ready=False) as s:
        r = httpx.get(s.url + "/health", timeout=10)
        assert r.status_code == 503 and r.json()["status"] == "loading"
        assert s.proc.wait(timeout=60) == 1
        s._reader.join(timeout=10)
        errors = [line for line in s.lines if line.startswith("error:")]
        assert len(errors) == 1 and "tasks.safetensors does not match its sha256" in errors[0], s.log()
        assert not any("Traceback" in line for line in s.lines), s.log()

    b = tmp_path / "bundle"
    shutil.copytree(served["bundle"], b)
    with server(b, "--api-key", KEY) as s:
        c = s.client()
        _flip_a_byte(b / "tasks.safetensors")
        r = httpx.post(s.url + "/admin/reload", json={}, headers=AUTH, timeout=60)
        err = r.json()["error"]
        assert r.status_code == 409 and err["code"] == "reload_failed" and "tasks.safetensors" in err["message"], r.text
        assert set(err) == {"message", "type", "param", "code"}
        os.kill(s.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not any("reload refused" in line for line in s.lines):
            assert time.monotonic() < deadline, s.log()
            time.sleep(0.05)
        assert httpx.get(s.url + "/health").json()["status"] == "ready"
        r = c.completions.create(model="sst2", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert r.choices[0].text == offline("sst2", PROMPTS[0], 6)
        assert not any("Traceback" in line for line in s.lines), s.log()
        assert s.stop() == 0


def test_a_second_server_on_a_taken_port_stops_with_one_line(served):
    """A port another server holds: the new one exits 1 with one line naming the likely cause and what to do; the
    old one's /health names its process (what a wait loop can tell its own server by)."""
    with server(served["bundle"]) as first:
        res = subprocess.run([str(EXE), "serve", str(served["bundle"]), "--port", str(first.port)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert f"port {first.port} on 127.0.0.1 is in use" in res.stderr and "another --port" in res.stderr
        assert httpx.get(first.url + "/health").json() == {"status": "ready", "pid": first.proc.pid}
        assert first.stop() == 0

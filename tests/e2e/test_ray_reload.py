"""`mpt-export serve --ray`, for real, while its bundle changes: reload through one replica and by SIGHUP (every
replica takes the digest, none restarted), a replacement replica serving the served digest (not the disk's), a graph
change refused; then the stop, after which no process of the server's tree is left and its Ray token is gone.

The server is the run's one Ray server (tests/e2e/conftest.py), on a copy of the llama bundle that these checks change
with `mpt-export tasks add/remove`; test_ray_proxy.py uses it first, these checks run in order after it, and the last
one stops it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
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
from mpt_export.runtime.memory import descendants  # noqa: E402
from rayserver import case, srv, AUTH, PROMPTS, complete  # noqa: E402
from support import EXE  # noqa: E402

pytestmark = pytest.mark.xdist_group("ray")  # one Ray server for both modules, in this order, on one worker


def tasks_cli(*args):
    r = subprocess.run([str(EXE), "tasks", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


# -- reload ------------------------------------------------------------------------------------------------------

def _check_one_service(srv, case, tasks: list[str], digest: str, replicas: set[str] | None = None) -> dict:
    """Both replicas answer /v1/models with the same body, listing ``tasks``, and serve ``digest``."""
    health = srv.replicas()
    assert len(health) == 2, health
    assert {h["digest"] for h in health.values()} == {digest}, health
    if replicas is not None:
        assert set(health) == replicas, "a reload restarted replicas instead of reconfiguring them"
    models = srv.models_by_replica()
    assert len(models) == 2, models
    bodies = [b for bs in models.values() for b in bs]
    assert all(b == bodies[0] for b in bodies), "/v1/models differs between replicas"
    assert [m["id"] for m in bodies[0]["data"]] == tasks
    return health


def _all_succeed(srv, task: str, like: str, want: dict, n: int = 30) -> set[str]:
    client = srv.client()
    jobs = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda p: complete(client, task, p), jobs))
    for p, (text, _) in zip(jobs, got):
        assert text == want[(like, p)], (task, p)
    return {r for _, r in got}


def test_ray_reload_reaches_every_replica(srv, case):
    tasks, want = case["tasks"], case["want"]
    before = srv.replicas()
    assert len(before) == 2
    tasks_cli("add", case["bundle"], "--adapter", f"t2={case['llama'].target}")  # t2 has t's vectors
    r = httpx.post(srv.url + "/admin/reload", headers=AUTH, json={}, timeout=300)
    assert r.status_code == 200, r.text
    res = r.json()
    digest = mpt_export.load_bundle(case["bundle"]).manifest["manifest_sha256"]
    assert res["added"] == ["t2"] and res["removed"] == [] and res["tasks"] == tasks + ["t2"]
    assert res["digest"] == digest != case["state"]["digest"]
    assert res["replicas"] == {rep: digest for rep in before}, res["replicas"]  # answered when all had it
    # every request for the new task succeeds, whichever replica takes it
    seen = _all_succeed(srv, "t2", tasks[-1], want)
    _check_one_service(srv, case, tasks + ["t2"], digest, replicas=set(before))
    assert seen <= set(before)
    case["state"]["digest"] = digest


def test_ray_sighup_reloads_every_replica(srv, case):
    tasks, want = case["tasks"], case["want"]
    before = set(srv.replicas())
    tasks_cli("remove", case["bundle"], "t2")
    tasks_cli("add", case["bundle"], "--adapter", f"t3={case['llama'].target}")
    digest = mpt_export.load_bundle(case["bundle"]).manifest["manifest_sha256"]
    mark = len(srv.lines)
    os.kill(srv.proc.pid, signal.SIGHUP)
    line = srv.wait_line("SIGHUP: reloaded", mark)
    assert digest[:12] in line and "t3" in line, line
    _all_succeed(srv, "t3", tasks[-1], want)
    _check_one_service(srv, case, tasks + ["t3"], digest, replicas=before)
    with pytest.raises(openai.NotFoundError):
        srv.client().completions.create(model="t2", prompt="x", max_tokens=2)
    case["state"]["digest"] = digest


def test_ray_replacement_serves_the_served_digest(srv, case):
    """The bundle on disk changes without a reload, then a replica is killed: Serve's replacement opens the digest
    the service serves (pinned by the driver), not what is on disk; requests meanwhile all succeed."""
    tasks, want = case["tasks"], case["want"]
    served = case["state"]["digest"]
    tasks_cli("add", case["bundle"], "--adapter", f"t4={case['llama'].target}")  # on disk only
    pids = {rep: h["pid"] for rep, h in srv.replicas().items()}
    assert len(pids) == 2, pids
    victim, pid = sorted(pids.items())[0]
    assert pid in descendants(srv.proc.pid)  # a process of this test's server, nobody else's
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    client = srv.client()
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
    health = _check_one_service(srv, case, tasks + ["t3"], served)
    assert victim not in health
    for _ in range(6):
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="t4", prompt="x", max_tokens=2)


def test_ray_reload_refuses_a_graph_change(srv, case):
    """A reload only takes task vectors: a re-exported backbone is refused (409 restart_required), as by the
    single-process server, and the service keeps serving its digest."""
    llama = case["llama"]
    mpt_export.export_bundle(llama.base, llama.adapters, case["bundle"], force=True, dtype="fp16",
                             validate=False).close()
    r = httpx.post(srv.url + "/admin/reload", headers=AUTH, json={}, timeout=300)
    assert r.status_code == 409 and r.json()["error"]["code"] == "restart_required", r.text
    _check_one_service(srv, case, case["tasks"] + ["t3"], case["state"]["digest"])
    assert _all_succeed(srv, "t3", case["tasks"][-1], case["want"], n=6)


def test_ray_stop_leaves_nothing(srv):
    token = getattr(srv, "token", None)
    rc, left = srv.stop()
    try:
        assert rc == 0, srv.lines[-20:]
        assert not left, f"Ray processes left running after the server stopped: {left}"
        if token is not None:  # the token file is gone, and the token was never logged
            assert not srv.token_file.exists() and not srv.token_file.parent.exists()
            assert not any(token in line for line in srv.lines)
            for p in Path(srv.tmp).rglob("*"):
                if p.is_file() and not p.is_symlink() and p.stat().st_size < 64 << 20:
                    assert token.encode() not in p.read_bytes(), f"the Ray token is written in {p}"
    finally:
        shutil.rmtree(srv.tmp, ignore_errors=True)

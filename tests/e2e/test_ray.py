"""`mpt-export serve --ray`, for real, as a client meets it and while its bundle changes: a local Ray instance
started by the server process this run launches (2 CPU replicas), driven over Serve's HTTP proxy by the official
`openai` client and httpx — mixed tasks equal their offline results, overload answers OpenAI-shaped 429s — while every
other listener of the process tree (the private control plane) refuses a client without the run's token; bad --ray
options fail before any Ray starts. Then reloads through one replica and by SIGHUP (every replica takes the digest,
none restarted), a replacement replica serving the served digest (not the disk's), a graph change refused; then the
stop, after which no process of the server's tree is left and its Ray token is gone. Every Ray process is a
descendant of that server process; the server is stopped by pid (never `ray stop`, which stops by name).

One module, so its checks run in order on one test worker: they share the run's one Ray server (Ray takes ~30-50 s
to start; tests/e2e/conftest.py) on a copy of the llama bundle that the reload checks change with `mpt-export tasks
add/remove`, and the last check stops it."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
    # found, not imported: Ray in the test runner's own process would only make it bigger
    pytest.skip("needs the ray extra (pip install 'mpt-export[ray]'; make test installs it)", allow_module_level=True)
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")
grpc = pytest.importorskip("grpc")

import mpt_export  # noqa: E402
from mpt_export.runtime.memory import descendants  # noqa: E402
from rayserver import case, srv, AUTH, PROMPTS, complete  # noqa: E402
from support import EXE  # noqa: E402


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def test_ray_replicas_mixed_tasks(srv, case):
    tasks, want = case["tasks"], case["want"]
    client = srv.client()
    assert [m.id for m in client.models.list().data] == tasks
    # concurrent, mixed tasks (within one replica's capacity, 4 running + 4 waiting, wherever Serve's router sends
    # them): each equals its offline result, both replicas answered
    jobs = [(tasks[i % len(tasks)], PROMPTS[i % len(PROMPTS)]) for i in range(24)]
    with ThreadPoolExecutor(6) as pool:
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
    # every replica serves the digest the driver announced
    digests = {h["digest"] for h in srv.replicas().values()}
    assert len(digests) == 1 and any(d[:12] in line for d in digests for line in srv.lines if "serving " in line)
    case["state"]["digest"] = digests.pop()


def test_ray_overload_answers_429_json(srv, case):
    """Past the engines' capacity (2 replicas x (4 running + 4 waiting)) the replicas answer OpenAI-shaped 429s
    themselves; Serve's router never sheds with its plain-text 503."""
    tasks = case["tasks"]

    def one(i):
        r = httpx.post(srv.url + "/v1/completions", headers=AUTH, timeout=120,
                       json={"model": tasks[i % len(tasks)], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 40,
                             "temperature": 0})
        return r.status_code, r.headers.get("content-type", ""), r.headers.get("retry-after"), r.content

    statuses, refused = [], []
    deadline = time.monotonic() + 180
    for _ in range(4):  # bounded in rounds and in time: one round is usually enough
        with ThreadPoolExecutor(64) as pool:
            got = list(pool.map(one, range(128)))
        statuses += [s for s, *_ in got]
        refused += [g for g in got if g[0] == 429]
        if refused or time.monotonic() > deadline:
            break
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert refused, f"no request was refused in {len(statuses)} (statuses {sorted(set(statuses))})"
    for status, ctype, retry, body in refused:
        assert ctype.startswith("application/json"), (ctype, body[:200])
        err = json.loads(body)["error"]
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error" and retry == "1", err
    print(f"\nray overload: {statuses.count(200)} answered, {len(refused)} refused with 429 queue_full")


# -- the control plane -------------------------------------------------------------------------------------------

def _proc_listeners(pids: set[int]) -> list[tuple[str, int, set[int]]]:
    """Every TCP socket in LISTEN state held by ``pids``, IPv4 and IPv6: (address, port, pids holding it)."""
    inodes: dict[int, set[int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.setdefault(int(link[8:-1]), set()).add(pid)
    out = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] != "0A" or int(f[9]) not in inodes:  # 0A: LISTEN
                continue
            hexaddr, hexport = f[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if family == socket.AF_INET:
                addr = socket.inet_ntop(family, raw[::-1])
            else:  # four host-order 32-bit words
                addr = socket.inet_ntop(family, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
            out.append((addr, int(hexport, 16), inodes[int(f[9])]))
    return out


def _loopback(addr: str) -> bool:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _host_addresses() -> dict[int, str | None]:
    """A non-loopback address of this machine per family (where it has one), to reach wildcard listeners the way
    another machine would."""
    out: dict[int, str | None] = {socket.AF_INET: None, socket.AF_INET6: None}
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent: the kernel picks the source address of that route
            a = s.getsockname()[0]
            out[socket.AF_INET] = None if _loopback(a) else a
    except OSError:
        pass
    try:
        for row in Path("/proc/net/if_inet6").read_text().splitlines():
            f = row.split()
            if f[3] == "00" and f[5] != "lo":  # global scope
                out[socket.AF_INET6] = str(ipaddress.IPv6Address(bytes.fromhex(f[0])))
                break
    except OSError:
        pass
    return out


def _target(addr: str, hosts: dict) -> str:
    ip = ipaddress.ip_address(addr)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.is_unspecified:  # 0.0.0.0 / :: (*): from this machine's own non-loopback address where it has one
        other = hosts[socket.AF_INET6] if ip.version == 6 else None
        return other or hosts[socket.AF_INET] or ("::1" if ip.version == 6 else "127.0.0.1")
    return str(ip)


# one read-only method per gRPC service Ray runs (GCS, raylet, object manager, core workers, agent, Serve replicas)
PROBES = ["/ray.rpc.NodeInfoGcsService/GetAllNodeInfo", "/ray.rpc.NodeManagerService/GetNodeStats",
          "/ray.rpc.ObjectManagerService/Pull", "/ray.rpc.CoreWorkerService/GetCoreWorkerStats",
          "/ray.rpc.ReporterService/HealthCheck", "/ray.rpc.LogService/ListLogs", "/ray.serve.ASGIService/HandleRequest"]


def _grpc_probe(target: str, port: int, metadata=None, methods=PROBES) -> dict[str, str]:
    """Unauthenticated (unless ``metadata``) unary calls with an empty body: method -> status code name."""
    host = f"[{target}]" if ":" in target else target
    out = {}
    with grpc.insecure_channel(f"{host}:{port}") as ch:
        for m in methods:
            call = ch.unary_unary(m, request_serializer=lambda b: b, response_deserializer=lambda b: b)
            try:
                call(b"", timeout=5, metadata=metadata)
                out[m] = "OK"
            except grpc.RpcError as e:
                out[m] = e.code().name
    return out


def _http_probe(target: str, port: int) -> tuple[int | None, str]:
    host = f"[{target}]" if ":" in target else target
    try:
        r = httpx.get(f"http://{host}:{port}/", timeout=5)
        return r.status_code, r.text[:200]
    except httpx.HTTPError as e:
        return None, type(e).__name__


def _classify(target: str, port: int) -> tuple[str, str]:
    """-> ('refused' | 'accepted' | 'unknown', what was seen) for an unauthenticated client."""
    g = _grpc_probe(target, port)
    if "OK" in g.values():
        return "accepted", f"gRPC {[m for m, c in g.items() if c == 'OK']} answered without a token"
    if "UNAUTHENTICATED" in g.values():
        return "refused", "gRPC UNAUTHENTICATED"
    status, text = _http_probe(target, port)
    if status in (401, 403):
        return "refused", f"HTTP {status}"
    if status is not None:
        return "accepted", f"HTTP {status} {text[:60]!r}"
    return "unknown", f"gRPC {sorted(set(g.values()))}, HTTP {text}"


def test_ray_control_plane_private(srv):
    """Every listener of the server's process tree (IPv4 and IPv6, * included): off loopback, an unauthenticated
    client is refused on each one (only the user's own HTTP port is exempt); every gRPC server of Ray refuses calls
    without the token; a call with the run's token goes through (so the probes do reach the servers)."""
    tree = {srv.proc.pid} | descendants(srv.proc.pid)
    listeners = _proc_listeners(tree)
    assert any(port == srv.port for _, port, _ in listeners), listeners
    hosts = _host_addresses()
    report, bad = [], []
    for addr, port, pids in sorted(listeners, key=lambda x: x[1]):
        who = sorted({cmdline(p).split(" ")[0].rsplit("/", 1)[-1] for p in pids})
        if port == srv.port:
            assert _loopback(addr), f"the HTTP port listens on {addr}, not on --host 127.0.0.1"
            continue
        target = _target(addr, hosts)
        verdict, seen = _classify(target, port)
        if verdict == "unknown" and (addr, port) not in {(a, p) for a, p, _ in _proc_listeners(tree)}:
            continue  # closed meanwhile (a worker Ray let go): nothing listens there any more
        report.append(f"{addr}:{port} {who} via {target}: {verdict} ({seen})")
        if not _loopback(addr) and verdict != "refused":
            bad.append(report[-1])
        elif _loopback(addr) and verdict == "accepted" and not seen.startswith("HTTP 200 '# HELP"):
            bad.append(report[-1])  # on loopback only Ray's read-only Prometheus endpoints may answer without a token
        elif verdict == "unknown":
            bad.append(report[-1])
    print("\nray listeners:\n  " + "\n  ".join(report))
    assert not bad, "listeners that do not refuse an unauthenticated client:\n" + "\n".join(bad)
    assert any("gRPC UNAUTHENTICATED" in r for r in report)

    # the run's token: a 0600 file in a 0700 directory of the driver's, handed to Ray by RAY_AUTH_TOKEN_PATH
    gcs = [p for p in tree if "gcs_server" in cmdline(p)]
    assert len(gcs) == 1, gcs
    env = dict(kv.split("=", 1) for kv in Path(f"/proc/{gcs[0]}/environ").read_bytes().decode().split("\0") if "=" in kv)
    assert env.get("RAY_AUTH_MODE") == "token" and "RAY_AUTH_TOKEN" not in env, sorted(env)
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token_file.stat().st_mode & 0o777 == 0o600 and token_file.parent.stat().st_mode & 0o777 == 0o700
    token = token_file.read_text().strip()
    assert len(token) >= 32
    srv.token, srv.token_file = token, token_file
    addr, port = next((a, p) for a, p, pids in listeners if gcs[0] in pids
                      and _grpc_probe(_target(a, hosts), p, methods=PROBES[:1])[PROBES[0]] == "UNAUTHENTICATED")
    ok = _grpc_probe(_target(addr, hosts), port, metadata=[("authorization", f"Bearer {token}")], methods=PROBES[:1])
    assert ok[PROBES[0]] == "OK", ok
    # never printed, never on a command line
    assert not any(token in line for line in srv.lines)
    assert not any(token in cmdline(p) for p in tree)


# -- options, checked before any Ray starts ----------------------------------------------------------------------------

def test_ray_cli_errors(tmp_path):
    """Bad --ray options: one line, exit 1, no Ray started."""
    from support import run_cli

    from mpt_export.errors import InputError

    r = run_cli("serve", tmp_path / "nope", "--ray")
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout
    r = run_cli("serve", tmp_path, "--replicas", "2")
    assert r.returncode == 1 and "--ray" in r.stdout + r.stderr
    for bad in ("3", "a:b", "4:2", "0:0"):
        from mpt_export.serving.ray.service import parse_autoscale

        with pytest.raises(InputError, match="MIN:MAX"):
            parse_autoscale(bad)
    assert parse_autoscale("1:4") == (1, 4)


def test_ray_deployment_options_leave_the_429_to_the_engine():
    """Serve lets a replica hold more requests than its scheduler (so the scheduler's 429 answers first) and its router
    never sheds with a plain-text 503."""
    from mpt_export.serving.ray.service import deployment_options

    o = deployment_options(2, None, 4, 4, 1.0, 0.0, 30.0)
    assert o["max_ongoing_requests"] > 4 + 4 and o["max_queued_requests"] == -1
    o = deployment_options(None, (1, 3), 16, 256, 1.0, 0.0, 30.0)
    assert o["max_ongoing_requests"] > 16 + 256 and o["autoscaling_config"]["target_ongoing_requests"] == 16


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
    # at most --max-queue (4) requests at once: all of them may reach one replica between two of its steps, and a
    # fifth would be a correct 429 (the overload test proves that), not a failure of what is checked here
    with ThreadPoolExecutor(4) as pool:
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


def test_ray_tasks_loaded_over_http_reach_every_replica(srv, case):
    """POST /admin/tasks on one replica: the call answers once every replica serves the new digest; DELETE too."""
    tasks, want = case["tasks"], case["want"]
    before = set(srv.replicas())
    r = httpx.post(srv.url + "/admin/tasks", headers=AUTH, timeout=300,
                   json={"name": "loaded", "adapter": str(case["adapters"] / "target")})
    assert r.status_code == 201, r.text
    digest = r.json()["digest"]
    assert digest == mpt_export.load_bundle(case["bundle"]).manifest["manifest_sha256"]
    now = mpt_export.load_bundle(case["bundle"]).tasks
    _check_one_service(srv, case, now, digest, replicas=before)  # every replica, before the call answered
    _all_succeed(srv, "loaded", tasks[-1], want, n=6)
    r = httpx.delete(srv.url + "/admin/tasks/loaded", headers=AUTH, timeout=300)
    assert r.status_code == 200, r.text
    _check_one_service(srv, case, [t for t in now if t != "loaded"], r.json()["digest"], replicas=before)
    case["state"]["digest"] = r.json()["digest"]


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

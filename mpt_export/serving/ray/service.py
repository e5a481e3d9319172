"""``mpt-export serve BUNDLE --ray``: the same server as Ray Serve replicas (``ray[serve]`` from the ``ray`` extra).

One Serve deployment whose replicas each run what ``mpt-export serve`` runs in one process — a
:class:`~mpt_export.serving.http.state.ServerState` (session + continuous-batching engine) under the same Starlette app
(:func:`~mpt_export.serving.http.app.build_app`) — behind Serve's HTTP proxy. Why it is built this way:

- **No model multiplexing.** Serve's multiplexing routes by model id, so every batch would hold one task; here the
  task travels in the request body (``model``) and each replica's engine batches every task together.
- **One service, one bundle digest.** The digest is the manifest's own sha256 (it covers every file's sha256). The
  driver (this process) verifies the bundle, keeps a *pin* of what a reload can change — the manifest and
  ``tasks.safetensors``, held by a small named actor the driver owns (:class:`_Control`) — and deploys with
  ``user_config={"digest": ...}``. Serve calls each replica's ``reconfigure`` with it: right after the constructor
  (before the replica gets traffic: a replacement replica too) and on every running replica when the driver deploys
  a new digest (same code version and options, so Serve reconfigures in place instead of restarting replicas). A
  replica serves the graphs and tokenizer of the bundle path on its node (verified, and refused when they are not
  the pinned manifest's: a re-exported bundle needs a restart) with the *pinned* task bank, never whatever
  ``tasks.safetensors`` is on disk now.
- **Reload reaches every replica.** ``POST /admin/reload`` on whichever replica Serve routes it to, and SIGHUP to
  the driver, ask the driver (through the control actor) to reload the service: it reads the bundle on disk, refuses
  graph or tokenizer changes (409 ``restart_required``, as the single-process server does), pins the new task bank,
  redeploys with the new digest and answers only when every live replica reports that digest — with the digest, the
  tasks added and removed, and each replica's digest (or which replicas did not take it). A pin is dropped only once
  no replica serves it any more.
- **Private control plane.** A local Ray instance started here gets a node address of 127.0.0.1 (so its GCS,
  raylet, workers and agents listen on loopback) and Ray's token authentication with a fresh token made for this run
  (``RAY_AUTH_MODE=token``, the token in a 0600 file in a 0700 directory this process owns, handed to Ray by
  ``RAY_AUTH_TOKEN_PATH``, never printed, removed at exit). Ray's metrics exporter is turned off (each replica has
  ``/metrics``). With ``--ray-address`` the cluster is the user's: it must run with token authentication itself.
- **Health = readiness.** A replica is ready when its first ``reconfigure`` returns (bundle open, engine running);
  Serve's health check (``check_health``) fails when the engine thread died or the state is not ready, and Serve
  replaces that replica. ``/health`` says which replica and process answered and the digest it serves.
- **Load and queueing.** A replica takes ``max_batch + max_queue`` requests into its engine (one batch running, a
  bounded queue waiting); Serve lets a replica hold more than that (``max_ongoing_requests`` adds headroom), so past
  the engine's capacity the replica itself answers an OpenAI-shaped 429 (``queue_full``) at once instead of Serve's
  router shedding with its plain-text 503. The router's queue is left unbounded: a request waits there only while
  every replica holds ``max_ongoing_requests``, which the quick 429s keep short. Autoscaling targets one full batch
  per replica (``target_ongoing_requests = max_batch``).
- Every response carries ``X-Mpt-Export-Replica`` (the replica id).

The driver starts a local Ray instance, or joins a running cluster with ``address``; it deploys the application,
then serves reload requests until SIGTERM/SIGINT, deletes the application (Serve lets each replica finish its
requests within ``drain_timeout``) and, if it started Ray, shuts it down (the Ray processes it started exit with it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ...bundle.reader import Bundle
from ...errors import BundleError, InputError, MissingDependencyError, MptExportError

APP_NAME = "mpt-export"
REPLICA_HEADER = "X-Mpt-Export-Replica"
CONTROL_NAMESPACE = "mpt-export"
PINNED = "tasks.safetensors"  # with the manifest: all a reload may change
RELOAD_TIMEOUT = 300.0  # a replica waits this long for the driver's answer
REPLICAS_TIMEOUT = 120.0  # the driver waits this long for every replica to report a new digest


def import_ray():
    try:
        import ray
        from ray import serve
    except ImportError:
        raise MissingDependencyError("--ray needs Ray Serve: pip install 'mpt-export[ray]'") from None
    return ray, serve


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """``MIN:MAX`` -> (min, max) replicas; one clear error otherwise."""
    if text is None:
        return None
    lo, sep, hi = str(text).partition(":")
    if not sep or not lo.strip().isdigit() or not hi.strip().isdigit():
        raise InputError(f"--autoscale takes MIN:MAX replicas (e.g. 1:4), got {text!r}")
    lo, hi = int(lo), int(hi)
    if hi < 1 or lo > hi:
        raise InputError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return lo, hi


def headroom(max_batch: int) -> int:
    """Requests a replica holds beyond its engine's capacity: the ones it answers without an engine row (its own
    429s, /health, /v1/models, /metrics, /admin) and those being read or tokenized."""
    return max(16, max_batch)


def deployment_options(replicas: int | None, autoscale: tuple[int, int] | None, max_batch: int, max_queue: int,
                       cpus: float, gpus: float, drain_timeout: float) -> dict:
    """The Serve deployment's options (see the module docstring for why each value)."""
    if replicas is not None and autoscale is not None:
        raise InputError("give either --replicas N or --autoscale MIN:MAX, not both")
    opts = {
        # more than the engine holds, so the engine's own 429 answers before Serve's router sheds (plain 503)
        "max_ongoing_requests": max_batch + max_queue + headroom(max_batch),
        "max_queued_requests": -1,  # Serve's router queue: only used while every replica is full, which 429s keep short
        "ray_actor_options": {"num_cpus": cpus, "num_gpus": gpus},
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": max(1.0, drain_timeout),
    }
    if autoscale is not None:
        lo, hi = autoscale
        opts["autoscaling_config"] = {"min_replicas": lo, "initial_replicas": max(lo, 1), "max_replicas": hi,
                                      "target_ongoing_requests": max_batch}
    else:
        n = 1 if replicas is None else int(replicas)
        if n < 1:
            raise InputError(f"--replicas must be >= 1, got {replicas}")
        opts["num_replicas"] = n
    return opts


# -- the pinned bundle -------------------------------------------------------------------------------------------

def graph_changes(old: dict, new: dict) -> list[str]:
    """Files other than the task bank whose sha256 differs between two manifests (graphs, weights, tokenizer)."""
    a = {k: v for k, v in old["files"].items() if k != PINNED}
    b = {k: v for k, v in new["files"].items() if k != PINNED}
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def make_pin(bundle: Bundle) -> dict:
    """What the service pins for ``bundle`` (opened and verified): its manifest and task bank bytes, checked."""
    from ...bundle.manifest import DIGEST_KEY

    data = bundle.read_bytes(PINNED)
    if hashlib.sha256(data).hexdigest() != bundle.manifest["files"][PINNED]:
        raise BundleError(f"{bundle.path}/{PINNED} changed while it was read; try again")
    return {"digest": bundle.manifest[DIGEST_KEY], "manifest": bundle.manifest, PINNED: data}


class PinnedBundle(Bundle):
    """A bundle whose manifest and task bank are the service's pin, and whose other files (graphs, weights,
    tokenizer — equal by sha256 to the pinned manifest's) are read through a directory handle of the bundle on this
    node. The task bank sits in a private temporary directory until :meth:`drop_pin` (after the bank is loaded)."""

    def __init__(self, path: Path, manifest: dict, fd: int, pin_dir: Path):
        super().__init__(path, manifest, fd)
        self._pin_dir = pin_dir

    def file(self, name: str) -> Path:
        if name == PINNED:
            return self._pin_dir / PINNED
        return super().file(name)

    def read_bytes(self, name: str) -> bytes:
        return (self._pin_dir / PINNED).read_bytes() if name == PINNED else super().read_bytes(name)

    def drop_pin(self) -> None:
        shutil.rmtree(self._pin_dir, ignore_errors=True)


def open_pinned(bundle_path: str | Path, pin: dict, current: Bundle | None = None) -> PinnedBundle:
    """The bundle a replica serves for ``pin``: the pin's manifest and task bank (checked against the pin's digest)
    over the graphs of ``current`` (the bundle the replica already serves: a reload) or of the bundle at
    ``bundle_path`` on this node (verified, and refused when its graphs or tokenizer are not the pinned ones)."""
    from ...bundle.reader import load_bundle
    from ...bundle.manifest import DIGEST_KEY, check_manifest, manifest_digest

    manifest, digest, data = pin["manifest"], pin["digest"], pin[PINNED]
    if manifest.get(DIGEST_KEY) != digest or manifest_digest(manifest) != digest:
        raise BundleError(f"the service's pinned manifest for digest {digest[:12]} does not match its own sha256")
    check_manifest(manifest)
    if hashlib.sha256(data).hexdigest() != manifest["files"].get(PINNED):
        raise BundleError(f"the service's pinned {PINNED} for digest {digest[:12]} does not match its manifest")
    if current is not None and getattr(current, "_fd", None) is not None:
        path, fd = current.path, os.dup(current._fd)  # the replica's open bundle: nothing on disk is read again
    else:
        disk = load_bundle(bundle_path)
        changed = graph_changes(disk.manifest, manifest)
        if changed:
            disk.close()
            raise BundleError(f"{bundle_path} on this node does not hold the graphs and tokenizer this service serves "
                              f"(digest {digest[:12]}): {', '.join(changed[:4])} differ; restart `mpt-export serve "
                              "--ray` to serve the bundle now on disk")
        path, fd, disk._fd = disk.path, disk._fd, None  # the handle moves to the pinned bundle
    pin_dir = Path(tempfile.mkdtemp(prefix="mpt-export-pin-"))
    try:
        fdw = os.open(pin_dir / PINNED, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fdw, "wb") as f:
            f.write(data)
    except BaseException:
        shutil.rmtree(pin_dir, ignore_errors=True)
        os.close(fd)
        raise
    return PinnedBundle(path, manifest, fd, pin_dir)


# -- the control actor: reload requests from replicas to the driver, pins, replica reports ----------------------

class _Control:
    """A named actor the driver owns (it dies with the driver). Replicas fetch pins and report the digest they serve
    here, and ask for reloads, which the driver takes (:meth:`take`), performs and answers (:meth:`answer`)."""

    def __init__(self):
        self.pins: dict[str, dict] = {}
        self.reports: dict[str, dict] = {}
        self.waiting: list = []  # futures of reload requests not taken yet
        self.taken: list = []  # futures of requests the reload in progress answers
        self.wake = None

    def _event(self) -> asyncio.Event:
        if self.wake is None:
            self.wake = asyncio.Event()
        return self.wake

    async def pin(self, pin: dict) -> None:
        self.pins[pin["digest"]] = pin

    async def keep_only(self, digests: list[str]) -> None:
        for d in [d for d in self.pins if d not in digests]:
            del self.pins[d]

    async def pinned(self, digest: str) -> dict | None:
        return self.pins.get(digest)

    async def report(self, replica: str, digest: str, pid: int) -> None:
        self.reports[replica] = {"digest": digest, "pid": pid, "time": time.time()}

    async def replica_reports(self) -> dict:
        return dict(self.reports)

    async def request_reload(self, timeout: float) -> dict:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        self._event().set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except asyncio.TimeoutError:
            return {"error": {"status": 504, "code": "reload_timeout",
                              "message": f"the service did not finish the reload within {timeout:g} s"}}

    async def take(self, timeout: float) -> int:
        """(driver) Wait up to ``timeout`` s for reload requests; -> how many the next :meth:`answer` answers."""
        if not self.waiting:
            self._event().clear()
            try:
                await asyncio.wait_for(self._event().wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self.taken, self.waiting = self.taken + self.waiting, []
        return len(self.taken)

    async def answer(self, result: dict) -> None:
        for fut in self.taken:
            if not fut.done():
                fut.set_result(result)
        self.taken = []


def _replica_state(bundle: str, control: tuple[str, str], options: dict):
    """A :class:`ServerState` whose ``reload()`` (``POST /admin/reload``) asks the driver to reload the service."""
    from ..http.protocol import APIError
    from ..http.state import ServerState

    class ReplicaState(ServerState):
        def reload(self, bundle=None) -> dict:
            if bundle is not None:  # the service's pinned bundle, from reconfigure
                return super().reload(bundle)
            import ray

            try:
                actor = ray.get_actor(control[0], namespace=control[1])
                result = ray.get(actor.request_reload.remote(RELOAD_TIMEOUT), timeout=RELOAD_TIMEOUT + 30)
            except Exception as e:  # the driver is gone or did not answer
                raise APIError(503, f"the service could not be asked to reload ({type(e).__name__}); retry",
                               code="reload_failed") from None
            if "error" in result:
                e = result["error"]
                raise APIError(int(e["status"]), e["message"], code=e["code"])
            return result

    return ReplicaState(bundle, **options)


def _deployment():
    """The Serve deployment class (defined on first use: importing this module loads no Ray)."""
    _, serve = import_ray()

    @serve.deployment(name=APP_NAME)
    @serve.ingress()
    class MptExportReplica:
        """One replica: the bundle's session and continuous-batching engine under the OpenAI routes. It opens the
        bundle in its first ``reconfigure`` (the digest the service serves), not in the constructor."""

        def __init__(self, bundle: str, options: dict, control: tuple[str, str]):
            self.bundle_path, self.control = bundle, tuple(control)
            self.state = _replica_state(bundle, self.control, options)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.identity = {"replica": self.replica, "pid": os.getpid(), "digest": None}
            self._lock = asyncio.Lock()

        def __serve_build_asgi_app__(self):
            from ..http.app import build_app

            return build_app(self.state, headers={REPLICA_HEADER: self.replica}, identity=self.identity)

        async def reconfigure(self, config: dict) -> None:
            import ray

            digest = config["digest"]
            async with self._lock:
                actor = ray.get_actor(self.control[0], namespace=self.control[1])
                if self.state.digest != digest:
                    pin = await actor.pinned.remote(digest)
                    if pin is None:
                        raise MptExportError(f"replica {self.replica}: the service no longer pins digest {digest[:12]}")
                    current = self.state.bundle
                    new = await asyncio.to_thread(open_pinned, self.bundle_path, pin, current)
                    try:
                        if current is None:
                            await asyncio.to_thread(self.state.load_from, new)
                        else:
                            await asyncio.to_thread(self.state.reload, new)
                    except BaseException:
                        new.close()
                        raise
                    finally:
                        new.drop_pin()
                self.identity["digest"] = self.state.digest
                await actor.report.remote(self.replica, self.state.digest, os.getpid())

        def check_health(self) -> None:
            engine = self.state.engine
            if self.state.status != "ready" or engine is None or not engine.alive():
                raise MptExportError(f"replica {self.replica}: {self.state.status}, engine "
                                     f"{'running' if engine and engine.alive() else 'stopped'}")

        def __del__(self):
            state = getattr(self, "state", None)
            if state is not None:
                state.drain(float(state.drain_timeout))
                state.close()

    return MptExportReplica


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- the driver ---------------------------------------------------------------------------------------------------

_PRIVATE_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def private_ray_env(workdir: Path) -> dict[str, str | None]:
    """The environment a local Ray instance started by this process inherits: token authentication with a fresh
    token (a 0600 file in ``workdir``), and a loopback node address (Ray's own switch for single-machine instances:
    its processes then listen on 127.0.0.1). -> the previous values, for :func:`restore_env`."""
    before = {k: os.environ.get(k) for k in _PRIVATE_ENV}
    token = workdir / "ray_auth_token"
    fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node address 127.0.0.1 (Ray: "single machine only")
    if "ray" in sys.modules:  # Ray read its config already (a library caller): make it read the new mode
        try:
            from ray._raylet import Config

            Config.initialize("")
        except Exception:
            pass
    return before


def restore_env(before: dict[str, str | None]) -> None:
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class _Service:
    """The driver's side of the service: the pin, the deployed digest, reloads."""

    def __init__(self, ray, serve, bundle: str, state_opts: dict, opts: dict, say):
        self.ray, self.serve, self.bundle, self.opts, self.say = ray, serve, bundle, opts, say
        self.control_name = f"mpt-export-control-{uuid.uuid4().hex[:12]}"
        self.app_args = (bundle, state_opts, (self.control_name, CONTROL_NAMESPACE))
        self.control = None
        self.manifest: dict | None = None  # the served digest's manifest
        self.pin: dict | None = None
        self.dep = _deployment()
        # One code version for this service's lifetime: a new digest is then only a new user_config, which Serve
        # applies by calling reconfigure on the running replicas (a new random version would restart them all).
        if hasattr(self.dep, "_version"):
            self.dep._version = f"mpt-export-{uuid.uuid4().hex}"

    @property
    def digest(self) -> str | None:
        return self.pin["digest"] if self.pin else None

    def start_control(self) -> None:
        actor = self.ray.remote(num_cpus=0)(_Control)
        self.control = actor.options(name=self.control_name, namespace=CONTROL_NAMESPACE).remote()
        if self.pin is not None:
            self.ray.get(self.control.pin.remote(self.pin))

    def deploy(self, digest: str) -> None:
        app = self.dep.options(user_config={"digest": digest}, **self.opts).bind(*self.app_args)
        self.serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)

    def start(self, bundle: Bundle) -> None:
        self.start_control()
        self.pin, self.manifest = make_pin(bundle), bundle.manifest
        self.ray.get(self.control.pin.remote(self.pin))
        self.deploy(self.digest)

    # replicas ------------------------------------------------------------------------------------------------
    def live_replicas(self) -> set[str]:
        """Ids of this deployment's replica actors that are alive (starting ones included)."""
        from ray.util import list_named_actors

        prefix = f"SERVE_REPLICA::{APP_NAME}#{APP_NAME}#"
        return {a["name"][len(prefix):] for a in list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith(prefix)}

    def replica_digests(self, digest: str, timeout: float) -> dict[str, str | None]:
        """Wait (up to ``timeout`` s) until every live replica reports ``digest``; -> each live replica's digest."""
        deadline = time.monotonic() + timeout
        while True:
            live = self.live_replicas()
            reports = self.ray.get(self.control.replica_reports.remote())
            seen = {r: (reports.get(r) or {}).get("digest") for r in sorted(live)}
            # no replica at all (autoscaled to 0, or all being replaced): the next ones start with this digest
            if all(d == digest for d in seen.values()) or time.monotonic() > deadline:
                return seen
            time.sleep(0.2)

    # reload ----------------------------------------------------------------------------------------------------
    def reload(self) -> dict:
        """Reload the service from the bundle on disk. -> the answer for the replicas (an ``error`` or the result)."""
        from ...bundle.reader import load_bundle

        def refuse(status: int, code: str, message: str) -> dict:
            return {"error": {"status": status, "code": code, "message": message}}

        try:
            new = load_bundle(self.bundle)
        except MptExportError as e:
            return refuse(409, "reload_failed", f"reload refused: {e}")
        try:
            changed = graph_changes(self.manifest, new.manifest)
            if changed:
                return refuse(409, "restart_required",
                              f"the bundle's graphs or tokenizer changed on disk ({', '.join(changed[:4])}); a reload "
                              "only takes new task vectors — restart the server to serve it")
            new.task_bank()  # the task list checked against the bank before any replica sees it
            pin = make_pin(new)
        except MptExportError as e:
            return refuse(409, "reload_failed", f"reload refused: {e}")
        finally:
            new.close()
        before = [t["name"] for t in self.manifest["tasks"]]
        after = [t["name"] for t in pin["manifest"]["tasks"]]
        old = self.pin
        if pin["digest"] != old["digest"]:
            self.ray.get(self.control.pin.remote(pin))
            try:
                self.deploy(pin["digest"])
            except Exception as e:  # Serve could not apply it: go back to the digest the replicas served
                try:
                    self.deploy(old["digest"])
                except Exception:
                    pass
                return refuse(500, "reload_failed", f"Ray Serve could not apply digest {pin['digest'][:12]}: "
                              f"{_short(e)}; the service keeps digest {old['digest'][:12]}")
            self.pin, self.manifest = pin, pin["manifest"]
        replicas = self.replica_digests(pin["digest"], REPLICAS_TIMEOUT)
        behind = {r: d for r, d in replicas.items() if d != pin["digest"]}
        if behind:
            # keep every pin a replica may still serve; Serve replaces a replica whose reconfigure failed
            return refuse(500, "reload_incomplete",
                          f"digest {pin['digest'][:12]} was deployed, but within {REPLICAS_TIMEOUT:g} s "
                          + ", ".join(f"replica {r} still serves {(d or 'nothing')[:12]}" for r, d in behind.items())
                          + " (Serve replaces a replica whose reconfigure failed; reload again to check)")
        self.ray.get(self.control.keep_only.remote([pin["digest"]]))
        return {"tasks": after, "added": [t for t in after if t not in before],
                "removed": sorted(set(before) - set(after)), "digest": pin["digest"], "replicas": replicas}

    def reload_and_say(self, why: str) -> dict:
        try:
            result = self.reload()
        except Exception as e:  # Ray itself failed (the control actor, the Serve controller): the driver goes on
            result = {"error": {"status": 500, "code": "reload_failed",
                                "message": f"the reload failed: {type(e).__name__}: {_short(e)}"}}
        if "error" in result:
            self.say(f"{why}: reload refused: {result['error']['message']}")
        else:
            self.say(f"{why}: reloaded digest {result['digest'][:12]} on {len(result['replicas'])} replicas — tasks: "
                     f"{', '.join(result['tasks'])}")
        return result

    def serve_requests(self, stop: threading.Event, hup: threading.Event) -> None:
        """The driver's loop: reload on SIGHUP and on replicas' requests, until ``stop``."""
        while not stop.is_set():
            if hup.is_set():
                hup.clear()
                self.reload_and_say("SIGHUP")
                continue
            try:
                n = self.ray.get(self.control.take.remote(0.5))
            except self.ray.exceptions.RayActorError:  # the control actor died: a new one, with the current pin
                self.say("the service's control actor stopped; starting a new one")
                self.start_control()
                continue
            if n:
                self.ray.get(self.control.answer.remote(self.reload_and_say("POST /admin/reload")))


def serve_ray(bundle: str, host: str = "127.0.0.1", port: int = 8000, replicas: int | None = None,
              autoscale: str | None = None, address: str | None = None, max_batch: int = 16, max_queue: int = 256,
              api_key: str | None = None, threads: int | None = None, provider: str = "cpu",
              drain_timeout: float = 30.0, max_body: int | None = None, prepack: bool | str = "auto",
              log=None) -> int:
    """Deploy the bundle on Ray Serve and run until SIGTERM/SIGINT. -> exit code."""
    from ...bundle.reader import load_bundle
    from ..http.protocol import DEFAULT_MAX_BODY

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    scale = parse_autoscale(autoscale)
    if drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {drain_timeout}")
    bundle = str(Path(bundle).resolve())
    served = load_bundle(bundle)  # verified here once: a wrong path fails now, and replicas on this node trust the stamp
    most = scale[1] if scale else (replicas or 1)
    if threads is None:  # each replica gets its share of this machine's cores (Ray schedules by num_cpus)
        threads = max(1, (os.cpu_count() or 1) // most) if address is None else 1
    gpus = 1.0 if provider.lower() in ("cuda", "tensorrt", "cudaexecutionprovider", "tensorrtexecutionprovider") else 0.0
    try:
        opts = deployment_options(replicas, scale, max_batch, max_queue, float(threads), gpus, drain_timeout)
    except BaseException:
        served.close()
        raise
    if port == 0:
        port = free_port(host)
    stop, hup = threading.Event(), threading.Event()
    started_ray = False
    workdir = Path(tempfile.mkdtemp(prefix="mpt-export-ray-"))  # 0700: the Ray token of a local instance
    env_before = private_ray_env(workdir) if not address else None
    try:
        ray, serve = import_ray()
        logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines about its own start
        if address:
            say(f"joining the Ray cluster at {address}")
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                say("warning: this Ray cluster runs without token authentication — anyone who can reach its ports "
                    "can run code on it; start it with RAY_AUTH_MODE=token and keep its ports off public networks")
        else:
            say("starting a local Ray instance (stops with this command; loopback only, token authentication)")
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     num_cpus=max(os.cpu_count() or 1, int(threads) * most),
                     _system_config={"enable_metrics_collection": False})
            started_ray = True
        # after ray.init: Ray's core worker installs its own SIGTERM handler, which would kill this driver outright
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        signal.signal(signal.SIGHUP, lambda *_: hup.set())
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        state_opts = {"provider": provider, "threads": threads, "max_batch": max_batch, "max_queue": max_queue,
                      "api_key": api_key, "max_body": max_body or DEFAULT_MAX_BODY, "prepack": prepack,
                      "drain_timeout": drain_timeout}
        service = _Service(ray, serve, bundle, state_opts, opts, say)
        t0 = time.perf_counter()
        try:
            service.start(served)
        except Exception as e:  # Serve's deploy failure carries the replica's constructor error in its text
            raise MptExportError(f"Ray Serve could not start the replicas: {_short(e)}") from None
        finally:
            served.close()
        how = (f"autoscaling {scale[0]}-{scale[1]} replicas" if scale else f"{opts['num_replicas']} replicas")
        say(f"serving {bundle} on http://{host}:{port} with Ray Serve ({how}, {threads:g} CPU each, ready in "
            f"{time.perf_counter() - t0:.1f} s) — digest {service.digest[:12]}")
        service.serve_requests(stop, hup)
        say(f"stopping: replicas finish their requests (up to {drain_timeout:g} s)")
        serve.delete(APP_NAME)
        return 0
    finally:
        served.close()
        try:
            if started_ray:
                try:
                    serve.shutdown()
                finally:
                    ray.shutdown()
            elif "ray" in sys.modules and sys.modules["ray"].is_initialized():
                sys.modules["ray"].shutdown()  # a joined cluster keeps running; only this driver disconnects
        finally:
            if env_before is not None:
                restore_env(env_before)
            shutil.rmtree(workdir, ignore_errors=True)


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # the replica's own error, when Serve quotes it
        if "MptExportError" in ln or "BundleError" in ln or "InputError" in ln:
            return ln[:400]
    return (lines[-1] if lines else type(e).__name__)[:400]

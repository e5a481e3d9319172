"""``mpt-export serve BUNDLE --ray``: the same server as Ray Serve replicas (``ray[serve]`` from the ``ray`` extra).

One Serve deployment whose replicas each run what ``mpt-export serve`` runs in one process — a
:class:`~mpt_export.serving.http.state.ServerState` (session + continuous-batching scheduler) under the same Starlette app
(:func:`~mpt_export.serving.http.app.build_app`) — behind Serve's HTTP proxy. This module is the driver; the
deployment's options are in :mod:`.options` (load and queueing), the pin in :mod:`.pin`, the control actor in
:mod:`.control`, the replicas in :mod:`.replica` (health = readiness) and the driver's Ray in :mod:`.cluster`
(a private control plane). Why it is built this way:

- **No model multiplexing.** Serve's multiplexing routes by model id, so every batch would hold one task; here the
  task travels in the request body (``model``) and each replica's scheduler batches every task together.
- **One service, one bundle digest.** The digest is the manifest's own sha256 (it covers every file's sha256). The
  driver (this process) verifies the bundle, keeps a *pin* of what a reload can change — the manifest and
  ``tasks.safetensors``, held by a small named actor the driver owns (:class:`~.control.Control`) — and deploys with
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

The driver starts a local Ray instance, or joins a running cluster with ``address``; it deploys the application,
then serves reload requests until SIGTERM/SIGINT, deletes the application (Serve lets each replica finish its
requests within ``drain_timeout``) and, if it started Ray, shuts it down (the Ray processes it started exit with it).
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

from ...bundle.reader import Bundle, load_bundle
from ...errors import MptExportError
from ...runtime.options import canonical_provider
from ..http.options import ServeOptions
from ...bundle.taskbank import name_list
from .cluster import leave_ray, private_ray_env, start_ray
from .control import CONTROL_NAMESPACE, Control
from .options import APP_NAME, REPLICA_HEADER, deployment_options, import_ray, parse_autoscale
from .pin import make_pin
from .replica import _deployment

__all__ = ["APP_NAME", "REPLICA_HEADER", "deployment_options", "free_port", "import_ray", "parse_autoscale",
           "serve_ray"]

REPLICAS_TIMEOUT = 120.0  # the driver waits this long for every replica to report a new digest


def free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Service:
    """The driver's side of the service: the pin, the deployed digest, reloads."""

    def __init__(self, ray, serve, bundle: str, options: ServeOptions, opts: dict, say):
        self.ray, self.serve, self.bundle, self.opts, self.say = ray, serve, bundle, opts, say
        self.control_name = f"mpt-export-control-{uuid.uuid4().hex[:12]}"
        self.app_args = (bundle, options, (self.control_name, CONTROL_NAMESPACE))
        self.control = None
        self.info = None  # the served digest's typed manifest
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
        actor = self.ray.remote(num_cpus=0)(Control)
        self.control = actor.options(name=self.control_name, namespace=CONTROL_NAMESPACE).remote()
        if self.pin is not None:
            self.ray.get(self.control.pin.remote(self.pin))

    def deploy(self, digest: str) -> None:
        app = self.dep.options(user_config={"digest": digest}, **self.opts).bind(*self.app_args)
        self.serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)

    def start(self, bundle: Bundle) -> None:
        self.start_control()
        self.pin, self.info = make_pin(bundle), bundle.info
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
        def refuse(status: int, code: str, message: str) -> dict:
            return {"error": {"status": status, "code": code, "message": message}}

        try:
            new = load_bundle(self.bundle)
        except MptExportError as e:
            return refuse(409, "reload_failed", f"reload refused: {e}")
        try:
            changed = self.info.changed_beyond_tasks(new.info)
            if changed:
                return refuse(409, "restart_required",
                              f"the bundle's graphs or tokenizer changed on disk ({', '.join(changed[:4])}); a reload "
                              "only takes new task vectors — restart the server to serve it")
            new.task_bank()  # the task list checked against the bank before any replica sees it
            pin, info = make_pin(new), new.info
        except MptExportError as e:
            return refuse(409, "reload_failed", f"reload refused: {e}")
        finally:
            new.close()
        before, after = self.info.task_names, info.task_names
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
            self.pin, self.info = pin, info
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
                     f"{name_list(result['tasks'])}")
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
            except self.ray.exceptions.RayError as e:  # the control actor died (killed, out of memory): a new one
                self.say(f"the service's control actor stopped ({type(e).__name__}); starting a new one")
                self.start_control()
                continue
            if n:
                answer = self.reload_and_say("POST /admin/reload")
                try:
                    self.ray.get(self.control.answer.remote(answer))
                except self.ray.exceptions.RayError:  # the askers' actor went away; they get reload_failed
                    self.start_control()


def serve_ray(bundle: str, options: ServeOptions | None = None, replicas: int | None = None,
              autoscale: str | None = None, address: str | None = None, log=None, started: float | None = None) -> int:
    """Deploy the bundle on Ray Serve and run until SIGTERM/SIGINT. -> exit code. ``options`` go to every replica
    (its scheduler and routes); Serve's HTTP proxy listens on their host and port. ``started``: the
    ``time.perf_counter()`` the "ready in" figure counts from (the command's start; default: this call's)."""
    started = time.perf_counter() if started is None else started
    o = options or ServeOptions()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    scale = parse_autoscale(autoscale)
    bundle = str(Path(bundle).resolve())
    served = load_bundle(bundle)  # verified here once: a wrong path fails now, and replicas on this node trust the stamp
    o.check_aliases(set(served.tasks))
    most = scale[1] if scale else (replicas or 1)
    threads = o.threads
    if threads is None:  # each replica gets its share of this machine's cores (Ray schedules by num_cpus)
        threads = max(1, (os.cpu_count() or 1) // most) if address is None else 1
    gpus = 1.0 if canonical_provider(o.provider) in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else 0.0
    try:
        opts = deployment_options(replicas, scale, o.max_batch, o.max_queue, float(threads), gpus, o.drain_timeout)
    except BaseException:
        served.close()
        raise
    host, port = o.host, (o.port or free_port(o.host))
    replica_options = o.with_(threads=threads)
    ray = serve = None
    started_ray = False
    workdir = Path(tempfile.mkdtemp(prefix="mpt-export-ray-"))  # 0700: the Ray token of a local instance
    env_before = private_ray_env(workdir) if not address else None
    try:
        ray, serve = import_ray()
        t_ray = time.perf_counter()
        started_ray = start_ray(ray, address, max(os.cpu_count() or 1, int(threads) * most), say)
        say(f"Ray {'started' if started_ray else 'joined'} in {time.perf_counter() - t_ray:.1f} s; starting Serve and "
            "the replicas")
        stop, hup = _take_signals()
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        how = (f"autoscaling {scale[0]}-{scale[1]} replicas" if scale else f"{opts['num_replicas']} replicas")
        _run(_Service(ray, serve, bundle, replica_options, opts, say), served, stop, hup,
             f"serving {bundle} on http://{host}:{port} with Ray Serve ({how}, {threads:g} CPU each", started)
        say(f"stopping: replicas finish their requests (up to {o.drain_timeout:g} s)")
        serve.delete(APP_NAME)
        return 0
    finally:
        served.close()
        leave_ray(ray, serve, started_ray, env_before, workdir)


def _run(service: _Service, served: Bundle, stop: threading.Event, hup: threading.Event, banner: str,
         started: float) -> None:
    """Deploy ``served`` (closed once deployed), say so after ``banner``, then serve reloads until ``stop``."""
    try:
        service.start(served)
    except Exception as e:  # Serve's deploy failure carries the replica's constructor error in its text
        raise MptExportError(f"Ray Serve could not start the replicas: {_short(e)}") from None
    finally:
        served.close()
    service.say(f"{banner}, ready {time.perf_counter() - started:.1f} s after the command started) — digest "
                f"{service.digest[:12]}")
    service.serve_requests(stop, hup)


def _take_signals() -> tuple[threading.Event, threading.Event]:
    """SIGTERM/SIGINT set ``stop``, SIGHUP sets ``hup``. Call it after ``ray.init``: Ray's core worker installs its own
    SIGTERM handler, which would kill this driver outright. -> (stop, hup)."""
    stop, hup = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: hup.set())
    return stop, hup


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # the replica's own error, when Serve quotes it
        if "MptExportError" in ln or "BundleError" in ln or "InputError" in ln:
            return ln[:400]
    return (lines[-1] if lines else type(e).__name__)[:400]

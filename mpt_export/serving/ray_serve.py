"""``mpt-export serve BUNDLE --ray``: the same server as Ray Serve replicas (``ray[serve]`` from the ``ray`` extra).

One Serve deployment whose replicas each run what ``mpt-export serve`` runs in one process — a
:class:`~mpt_export.serving.state.ServerState` (session + continuous-batching engine) under the same Starlette app
(:func:`~mpt_export.serving.app.build_app`) — behind Serve's HTTP proxy. Why it is built this way:

- **No model multiplexing.** Serve's multiplexing routes by model id, so every batch would hold one task; here the
  task travels in the request body (``model``) and each replica's engine batches every task together.
- **The bundle path, not its bytes**, goes to the replicas: each opens it from its node's disk (a shared path, or a
  copy checked with ``mpt-export verify``), verified like any open; a replica whose bundle does not load fails its
  constructor and Serve reports it.
- **Health = readiness.** A replica is ready when its constructor returns (bundle open, engine running); Serve's
  health check (``check_health``) fails when the engine thread died or the state is not ready, and Serve replaces
  that replica. A killed replica is replaced the same way.
- **Load and queueing.** ``max_ongoing_requests`` is ``max_batch + max_queue`` (what a replica's engine holds: one
  batch running, a bounded queue waiting), so requests reach a replica's engine rather than wait in Serve's router,
  the replica answers over-capacity with its own OpenAI-shaped 429, and Serve's router (power of two choices on
  ongoing requests) keeps replicas evenly loaded. Autoscaling targets one full batch per replica
  (``target_ongoing_requests = max_batch``).
- Every response carries ``X-Mpt-Export-Replica`` (the replica id), and ``/health`` says which replica and process
  answered, so an operator can see how requests spread.

The driver (this process) starts a local Ray instance, or joins a running cluster with ``address``; it deploys the
application, then waits for SIGTERM/SIGINT, deletes the application (Serve lets each replica finish its requests
within ``drain_timeout``) and, if it started Ray, shuts it down (the Ray processes it started exit with it).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import InputError, MissingDependencyError, MptExportError

APP_NAME = "mpt-export"
REPLICA_HEADER = "X-Mpt-Export-Replica"


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


def deployment_options(replicas: int | None, autoscale: tuple[int, int] | None, max_batch: int, max_queue: int,
                       cpus: float, gpus: float, drain_timeout: float) -> dict:
    """The Serve deployment's options (see the module docstring for why each value)."""
    if replicas is not None and autoscale is not None:
        raise InputError("give either --replicas N or --autoscale MIN:MAX, not both")
    opts = {
        "max_ongoing_requests": max_batch + max_queue,
        "max_queued_requests": max_queue,  # Serve's router queue (only used when every replica is full): bounded too
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


def _deployment():
    """The Serve deployment class (defined on first use: importing this module loads no Ray)."""
    _, serve = import_ray()

    @serve.deployment(name=APP_NAME)
    @serve.ingress()
    class MptExportReplica:
        """One replica: the bundle's session and continuous-batching engine under the OpenAI routes."""

        def __init__(self, bundle: str, options: dict):
            from .state import ServerState

            self.state = ServerState(bundle, **options)
            self.state.load()  # blocking: the replica is not ready (gets no traffic) until the engine runs
            if self.state.status != "ready":
                raise MptExportError(f"replica could not open {bundle}: {self.state.error}")
            self.replica = serve.get_replica_context().replica_id.unique_id

        def __serve_build_asgi_app__(self):
            from .app import build_app

            return build_app(self.state, headers={REPLICA_HEADER: self.replica},
                             identity={"replica": self.replica, "pid": os.getpid()})

        def check_health(self) -> None:
            if self.state.status != "ready" or not self.state.engine.alive():
                raise MptExportError(f"replica {self.replica}: {self.state.status}, engine "
                                     f"{'running' if self.state.engine and self.state.engine.alive() else 'stopped'}")

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


def serve_ray(bundle: str, host: str = "127.0.0.1", port: int = 8000, replicas: int | None = None,
              autoscale: str | None = None, address: str | None = None, max_batch: int = 16, max_queue: int = 256,
              api_key: str | None = None, threads: int | None = None, provider: str = "cpu",
              drain_timeout: float = 30.0, max_body: int | None = None, prepack: bool | str = "auto",
              log=None) -> int:
    """Deploy the bundle on Ray Serve and run until SIGTERM/SIGINT. -> exit code."""
    from ..bundle import load_bundle
    from .protocol import DEFAULT_MAX_BODY

    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    scale = parse_autoscale(autoscale)
    if drain_timeout < 0:
        raise InputError(f"--drain-timeout must be >= 0, got {drain_timeout}")
    bundle = str(Path(bundle).resolve())
    load_bundle(bundle).close()  # verified here once: a wrong path fails now, and replicas on this node trust the stamp
    most = scale[1] if scale else (replicas or 1)
    if threads is None:  # each replica gets its share of this machine's cores (Ray schedules by num_cpus)
        threads = max(1, (os.cpu_count() or 1) // most) if address is None else 1
    gpus = 1.0 if provider.lower() in ("cuda", "tensorrt", "cudaexecutionprovider", "tensorrtexecutionprovider") else 0.0
    opts = deployment_options(replicas, scale, max_batch, max_queue, float(threads), gpus, drain_timeout)
    ray, serve = import_ray()
    if port == 0:
        port = free_port(host)
    stop = threading.Event()
    started_ray = False
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's INFO lines about its own start
    try:
        if address:
            say(f"joining the Ray cluster at {address}")
            ray.init(address=address, log_to_driver=False, logging_level="ERROR")
        else:
            say("starting a local Ray instance (stops with this command)")
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR",
                     num_cpus=max(os.cpu_count() or 1, int(threads) * most))
            started_ray = True
        # after ray.init: Ray's core worker installs its own SIGTERM handler, which would kill this driver outright
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        state_opts = {"provider": provider, "threads": threads, "max_batch": max_batch, "max_queue": max_queue,
                      "api_key": api_key, "max_body": max_body or DEFAULT_MAX_BODY, "prepack": prepack,
                      "drain_timeout": drain_timeout}
        app = _deployment().options(**opts).bind(bundle, state_opts)
        t0 = time.perf_counter()
        try:
            serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        except Exception as e:  # Serve's deploy failure carries the replica's constructor error in its text
            raise MptExportError(f"Ray Serve could not start the replicas: {_short(e)}") from None
        how = (f"autoscaling {scale[0]}-{scale[1]} replicas" if scale else f"{opts['num_replicas']} replicas")
        say(f"serving {bundle} on http://{host}:{port} with Ray Serve ({how}, {threads:g} CPU each, ready in "
            f"{time.perf_counter() - t0:.1f} s)")
        while not stop.wait(0.5):
            pass
        say(f"stopping: replicas finish their requests (up to {drain_timeout:g} s)")
        serve.delete(APP_NAME)
        return 0
    finally:
        if started_ray:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        elif ray.is_initialized():
            ray.shutdown()  # a joined cluster keeps running; only this driver disconnects


def _short(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:  # the replica's own error, when Serve quotes it
        if "MptExportError" in ln or "BundleError" in ln or "InputError" in ln:
            return ln[:400]
    return (lines[-1] if lines else type(e).__name__)[:400]

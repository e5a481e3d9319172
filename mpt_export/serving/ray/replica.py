"""The Serve deployment: one replica runs what ``mpt-export serve`` runs in one process — a
:class:`~mpt_export.serving.http.state.ServerState` (session + continuous-batching scheduler) under the same Starlette app
(:func:`~mpt_export.serving.http.app.build_app`) — serving the service's pinned digest (see
:mod:`mpt_export.serving.ray.service`).

- **Health = readiness.** A replica is ready when its first ``reconfigure`` returns (bundle open, scheduler running);
  Serve's health check (``check_health``) fails when the scheduler thread died or the state is not ready, and Serve
  replaces that replica. ``/health`` says which replica and process answered and the digest it serves.
- Every response carries ``X-Mpt-Export-Replica`` (the replica id).
"""

from __future__ import annotations

import asyncio
import os

from ...errors import MptExportError
from .options import APP_NAME, REPLICA_HEADER, import_ray
from .pin import open_pinned
from ..http.app import build_app
from ..http.errors import APIError
from ..http.state import ServerState

RELOAD_TIMEOUT = 300.0  # a replica waits this long for the driver's answer


def _replica_state(bundle: str, control: tuple[str, str], options):
    """A :class:`ServerState` whose ``reload()`` (``POST /admin/reload``) asks the driver to reload the service."""
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

    return ReplicaState(bundle, options)


def _deployment():
    """The Serve deployment class (defined on first use: importing this module loads no Ray)."""
    _, serve = import_ray()

    @serve.deployment(name=APP_NAME)
    @serve.ingress()
    class MptExportReplica:
        """One replica: the bundle's session and continuous-batching scheduler under the OpenAI routes. It opens the
        bundle in its first ``reconfigure`` (the digest the service serves), not in the constructor."""

        def __init__(self, bundle: str, options, control: tuple[str, str]):
            self.bundle_path, self.control = bundle, tuple(control)
            self.state = _replica_state(bundle, self.control, options)
            self.replica = serve.get_replica_context().replica_id.unique_id
            self.identity = {"replica": self.replica, "pid": os.getpid(), "digest": None}
            self._lock = asyncio.Lock()

        def __serve_build_asgi_app__(self):
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
            scheduler = self.state.scheduler
            if self.state.status != "ready" or scheduler is None or not scheduler.alive():
                raise MptExportError(f"replica {self.replica}: {self.state.status}, scheduler "
                                     f"{'running' if scheduler and scheduler.alive() else 'stopped'}")

        def __del__(self):
            state = getattr(self, "state", None)
            if state is not None:
                state.drain(float(state.options.drain_timeout))
                state.close()

    return MptExportReplica

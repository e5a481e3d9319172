"""The OpenAI-compatible HTTP layer: a thin Starlette app over :class:`~mpt_export.scheduler.batching.Scheduler`.

Routes: ``GET /v1/models`` (one model per task), ``POST /v1/completions``, ``POST /v1/chat/completions`` (bundles
whose base model has a chat template), ``GET /health``, ``GET /metrics`` (Prometheus), ``POST /admin/reload``
(tasks added or removed on disk; refused when the graphs changed), ``GET /admin/steps`` (the scheduler's step record:
which requests ran in each graph call). Every error is OpenAI-shaped: ``{"error": {"message", "type", "param",
"code"}}``. Nothing from a client is unpickled or loaded as a tensor file; bodies are capped in size; with an API key
every ``/v1`` and ``/admin`` call needs ``Authorization: Bearer KEY`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import calendar
import hmac
import json
import time

from ...errors import MptExportError
from .completions import error_response, generate
from .edge import quiet_disconnects
from .hosts import host_guard
from .errors import APIError, error_body
from .protocol import read_json
from .state import ServerState
from .taskroutes import load_task, unload_task


def build_app(state: ServerState, headers: dict | None = None, identity: dict | None = None):
    """The ASGI app over ``state``. ``headers``: added to every response (Ray Serve: the replica id);
    ``identity``: added to ``/health``'s body (which replica and process answered)."""
    from starlette.applications import Starlette

    app = Starlette(routes=Routes(state, identity).routes(), exception_handlers={
        404: _not_found, 405: _not_allowed, 500: _internal_error})
    app.router.redirect_slashes = False  # a redirect is built from the request's Host: /admin/steps/ is a 404
    app.state.server = state
    allowed = state.options.host_allow_list
    app = host_guard(app, allowed) if allowed is not None else app
    return quiet_disconnects(_with_headers(app, headers) if headers else app)


def authorize(state: ServerState, request) -> None:
    """With an API key, the request must carry ``Authorization: Bearer KEY`` (compared in constant time)."""
    key = state.options.api_key
    if key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "a valid API key is required: send Authorization: Bearer <key>",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def ready(state: ServerState) -> None:
    """503 unless the bundle is loaded and the server is not shutting down."""
    if state.status == "loading":
        raise APIError(503, "the server is loading the bundle; retry shortly", code="loading",
                       headers={"Retry-After": "1"})
    if state.status == "draining":
        raise APIError(503, "the server is shutting down", code="draining")
    if state.status == "failed":
        raise APIError(503, f"the bundle could not be loaded: {state.error}", code="load_failed")


def json_body(request) -> None:
    """POSTs must say they carry JSON. A browser sends a cross-site form or ``text/plain`` POST without asking
    the server first (no CORS preflight); ``application/json`` needs a preflight, which this server never
    grants, so a web page cannot make a visitor's browser run completions or reloads here."""
    if request.method != "POST":
        return
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"POST {request.url.path} needs Content-Type: application/json, got "
                       f"{media or 'none'}", code="unsupported_media_type")


class Routes:
    """One handler per route, over ``state``; ``identity`` is added to ``/health``'s body."""

    def __init__(self, state: ServerState, identity: dict | None = None):
        self.state, self.identity = state, identity
        self._models = None  # (the task bank, the bundle digest, the /v1/models body made for them)

    def routes(self) -> list:
        from starlette.routing import Route

        guarded = self.guarded
        return [
            Route("/health", self.health, methods=["GET"]),
            Route("/metrics", guarded(self.metrics, needs_ready=False), methods=["GET"]),
            Route("/v1/models", guarded(self.models), methods=["GET"]),
            Route("/v1/completions", guarded(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", guarded(self.chat_completions), methods=["POST"]),
            Route("/admin/reload", guarded(self.reload), methods=["POST"]),
            Route("/admin/tasks", guarded(self.load_task), methods=["POST"]),
            Route("/admin/tasks/{name}", guarded(self.unload_task), methods=["DELETE"]),
            Route("/v1/load_lora_adapter", guarded(self.load_task), methods=["POST"]),  # vLLM's names for them
            Route("/v1/unload_lora_adapter", guarded(self.unload_task), methods=["POST"]),
            Route("/admin/steps", guarded(self.steps), methods=["GET"]),
        ]

    def guarded(self, handler, needs_ready: bool = True):
        """Every /v1 and /admin route and /metrics: the API key, a JSON body for POSTs, then readiness (not for
        /metrics); an APIError becomes its OpenAI-shaped answer."""
        async def run(request):
            try:
                authorize(self.state, request)
                json_body(request)
                if needs_ready:
                    ready(self.state)
                return await handler(request)
            except APIError as e:
                return error_response(self.state, e)
        return run

    async def health(self, request):
        from starlette.responses import JSONResponse

        state = self.state
        body = {"status": state.status, **(self.identity or {})}
        if state.status == "failed":  # the reason, OpenAI-shaped (the server then exits 1 with it on one line)
            try:
                ready(state)
            except APIError as e:
                body.update(error_body(e))
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    async def metrics(self, request):  # behind the key when there is one: its labels name the tasks
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.state.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        """One model per task, OpenAI-shaped; the body is made once per bundle digest (a reload makes it again), so
        100,000 tasks cost one encoding, not one per request."""
        from starlette.responses import Response

        bank = self.state.session.bank
        if self._models is None or self._models[0] is not bank or self._models[1] != self.state.digest:
            path, bundle = self.state.bundle_path, self.state.bundle
            created = _epoch(bundle.info.created_at if bundle is not None else None)  # the same on every replica
            data = [{"id": t, "object": "model", "created": created, "owned_by": "mpt-export",
                     "parent": path.name, "root": path.name} for t in bank.names]
            data += [{"id": a, "object": "model", "created": created, "owned_by": "mpt-export", "parent": t,
                      "root": path.name} for a, t in self.state.aliases.items() if t in bank]  # --task-alias
            body = await asyncio.to_thread(lambda: json.dumps({"object": "list", "data": data}).encode())
            self._models = (bank, self.state.digest, body)
        return Response(self._models[2], media_type="application/json")

    async def reload(self, request):
        from starlette.responses import JSONResponse

        try:
            result = await asyncio.to_thread(self.state.reload)
        except APIError:  # already an answer (restart_required, or a Ray service's own)
            raise
        except MptExportError as e:
            raise APIError(409, f"reload refused: {e}", code="reload_failed") from None
        return JSONResponse(result)

    async def load_task(self, request):
        from starlette.responses import JSONResponse

        vllm = request.url.path.startswith("/v1/")
        status, body = await load_task(self.state, await read_json(request, self.state.options.max_body_bytes), vllm)
        return JSONResponse(body, status_code=status)

    async def unload_task(self, request):
        from starlette.responses import JSONResponse

        if request.url.path.startswith("/v1/"):
            data = await read_json(request, self.state.options.max_body_bytes)
            name = data.get("lora_name")
            if not isinstance(name, str) or not name:
                raise APIError(400, "lora_name is required: a non-empty string", param="lora_name")
        else:
            name = request.path_params["name"]
        status, body = await unload_task(self.state, name)
        return JSONResponse(body, status_code=status)

    async def steps(self, request):
        from starlette.responses import JSONResponse

        since = request.query_params.get("since", "0")
        since = int(since) if since.isdigit() else 0
        scheduler = self.state.scheduler
        return JSONResponse({"steps": [s for s in list(scheduler.steps) if s["step"] > since],
                             "step_count": scheduler.step_count})

    async def completions(self, request):
        return await generate(self.state, request, chat=False)

    async def chat_completions(self, request):
        return await generate(self.state, request, chat=True)


def _epoch(created_at: str | None) -> int:
    """A manifest's ``created_at`` (UTC, ISO 8601) as Unix seconds; 0 where it has none."""
    try:
        return calendar.timegm(time.strptime(created_at, "%Y-%m-%dT%H:%M:%SZ"))
    except (TypeError, ValueError):
        return 0


def _not_found(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(APIError(404, f"no route {request.url.path}", code="not_found")), status_code=404)


def _not_allowed(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                            code="method_not_allowed")), status_code=405)


def _internal_error(request, exc):
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(APIError(500, "internal server error", code="internal_error")), status_code=500)


def _with_headers(app, headers: dict):
    """An ASGI wrapper adding ``headers`` to every HTTP response (streams included)."""
    extra = [(k.lower().encode(), str(v).encode()) for k, v in headers.items()]

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def send_with(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        await app(scope, receive, send_with)

    wrapped.state = app.state
    return wrapped

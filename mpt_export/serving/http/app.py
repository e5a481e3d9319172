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
import hmac

from ...errors import MptExportError
from .completions import error_response, generate
from .edge import quiet_disconnects
from .hosts import host_guard
from .errors import APIError, error_body
from .state import ServerState


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
        from starlette.responses import JSONResponse

        path = self.state.bundle_path
        created = int(path.stat().st_mtime) if path.exists() else 0
        data = [{"id": t, "object": "model", "created": created, "owned_by": "mpt-export",
                 "parent": path.name, "root": path.name} for t in self.state.session.tasks]
        return JSONResponse({"object": "list", "data": data})

    async def reload(self, request):
        from starlette.responses import JSONResponse

        try:
            result = await asyncio.to_thread(self.state.reload)
        except APIError:  # already an answer (restart_required, or a Ray service's own)
            raise
        except MptExportError as e:
            raise APIError(409, f"reload refused: {e}", code="reload_failed") from None
        return JSONResponse(result)

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

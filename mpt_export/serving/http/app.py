"""The OpenAI-compatible HTTP layer: a thin Starlette app over :class:`~mpt_export.engine.batching.Engine`.

Routes: ``GET /v1/models`` (one model per task), ``POST /v1/completions``, ``POST /v1/chat/completions`` (bundles
whose base model has a chat template), ``GET /health``, ``GET /metrics`` (Prometheus), ``POST /admin/reload``
(tasks added or removed on disk; refused when the graphs changed), ``GET /admin/steps`` (the engine's step record:
which requests ran in each graph call). Every error is OpenAI-shaped: ``{"error": {"message", "type", "param",
"code"}}``. Nothing from a client is unpickled or loaded as a tensor file; bodies are capped in size; with an API key
every ``/v1`` and ``/admin`` call needs ``Authorization: Bearer KEY`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from ...errors import MptExportError
from ...engine.request import Request
from .protocol import (APIError, api_error, chat_prompt, error_body, number, prompts_of, read_json, room_for, sampling, task_of, usage_of)
from .state import ServerState


def build_app(state: ServerState, headers: dict | None = None, identity: dict | None = None):
    """The ASGI app over ``state``. ``headers``: added to every response (Ray Serve: the replica id);
    ``identity``: added to ``/health``'s body (which replica and process answered)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    def error(e: APIError, task=None):
        state.count(task, e.status)
        return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)

    def authorize(request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise APIError(401, "a valid API key is required: send Authorization: Bearer <key>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    def ready() -> None:
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

    def guarded(handler):
        """Every /v1 and /admin route and /metrics: the API key, a JSON body for POSTs, then readiness (not for
        /metrics); an APIError becomes its OpenAI-shaped answer."""
        async def run(request):
            try:
                authorize(request)
                json_body(request)
                if handler is not metrics:
                    ready()
                return await handler(request)
            except APIError as e:
                return error(e)
        return run

    async def health(request):
        body = {"status": state.status, **({"error": state.error} if state.error else {}), **(identity or {})}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    async def metrics(request):  # behind the key when there is one: its labels name the tasks
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    @guarded
    async def models(request):
        created = int(state.bundle_path.stat().st_mtime) if state.bundle_path.exists() else 0
        data = [{"id": t, "object": "model", "created": created, "owned_by": "mpt-export",
                 "parent": state.bundle_path.name, "root": state.bundle_path.name} for t in state.session.tasks]
        return JSONResponse({"object": "list", "data": data})

    @guarded
    async def reload(request):
        try:
            result = await asyncio.to_thread(state.reload)
        except MptExportError as e:
            raise APIError(409, f"reload refused: {e}", code="reload_failed") from None
        return JSONResponse(result)

    @guarded
    async def steps(request):
        since = request.query_params.get("since", "0")
        since = int(since) if since.isdigit() else 0
        return JSONResponse({"steps": [s for s in list(state.engine.steps) if s["step"] > since],
                             "step_count": state.engine.step_count})

    @guarded
    async def completions(request):
        return await _generate(request, chat=False)

    @guarded
    async def chat_completions(request):
        return await _generate(request, chat=True)

    async def _generate(request, chat: bool):
        task = None
        try:
            data = await read_json(request, state.max_body)
            task = task_of(state, data)
            opts = sampling(data)
            # rendering and tokenizing grow with the prompt: a worker thread does them (the tokenizer releases
            # the GIL), after a size check that needs no tokenizer
            if chat:
                prompts = await asyncio.to_thread(chat_prompt, state, data.get("messages"))
            else:
                prompts = await asyncio.to_thread(prompts_of, data.get("prompt"), state.session.tokenizer, state)
            default_max = 16 if not chat else None
            max_tokens = data.get("max_completion_tokens") if chat and "max_tokens" not in data else data.get(
                "max_tokens")
            if max_tokens is None and default_max is None:  # chat: as much as the positions allow
                max_tokens = max(1, room_for(state, task, max(len(p) for p in prompts)))
            max_tokens = number({"max_tokens": max_tokens}, "max_tokens", default_max, 1, integer=True)
            return await _run(request, task, prompts, max_tokens, opts, chat)
        except APIError as e:
            return error(e, task)

    async def _run(request, task, prompts, max_tokens, opts, chat):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        reqs = []
        for i, ids in enumerate(prompts):
            def on_event(kind, payload, i=i):
                loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))

            reqs.append(Request(task=task, ids=ids, max_new_tokens=max_tokens, temperature=opts["temperature"],
                                top_k=opts["top_k"], top_p=opts["top_p"], seed=opts["seed"], seed_row=i,
                                stop=opts["stop"], on_event=on_event, id=f"{rid}-{i}"))
        try:
            for r in reqs:
                state.engine.submit(r)
        except (MptExportError, APIError) as e:
            for r in reqs:
                if r.t_submit:
                    state.engine.cancel(r.id)
            raise api_error(e) from None
        created = int(time.time())
        if opts["stream"]:
            return StreamingResponse(_stream(rid, created, task, reqs, queue, opts, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
        done = await _wait_all(request, reqs, queue)
        if not done:
            return Response(status_code=499)  # the client went away; its rows were freed
        failed = [r for r in reqs if r.error is not None]
        if failed:
            return error(APIError(500, f"generation failed: {failed[0].error}", code="generation_failed"), task)
        for r in reqs:
            state.observe(r)
        state.count(task, 200)
        usage = usage_of(reqs)
        if chat:
            r = reqs[0]
            choices = [{"index": 0, "message": {"role": "assistant", "content": r.text},
                        "logprobs": None, "finish_reason": r.finish_reason}]
            body = {"id": rid, "object": "chat.completion", "created": created, "model": task, "choices": choices,
                    "usage": usage}
        else:
            choices = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
                       for i, r in enumerate(reqs)]
            body = {"id": rid, "object": "text_completion", "created": created, "model": task, "choices": choices,
                    "usage": usage}
        return JSONResponse(body, headers={"X-Request-Id": rid})

    async def _wait_all(request, reqs, queue) -> bool:
        """Wait until every request is done; if the client disconnects first, cancel them. -> completed?"""
        pending = {i for i in range(len(reqs))}

        async def events():
            while pending:
                i, kind, _ = await queue.get()
                if kind in ("done", "error"):
                    pending.discard(i)

        async def disconnected():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        ev, dc = asyncio.ensure_future(events()), asyncio.ensure_future(disconnected())
        finished, _ = await asyncio.wait({ev, dc}, return_when=asyncio.FIRST_COMPLETED)
        for t in (ev, dc):
            if t not in finished:
                t.cancel()
        if ev in finished:
            return True
        for r in reqs:
            state.engine.cancel(r.id)
        state.count(reqs[0].task, 499)
        return False

    async def _stream(rid, created, task, reqs, queue, opts, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"
        pending = set(range(len(reqs)))
        status = 200

        def chunk(i, text=None, finish=None, role=False):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else {"content": text or ""}
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": task,
                                          "choices": [choice]}) + "\n\n"

        try:
            if chat:
                yield chunk(0, role=True)
            while pending:
                i, kind, payload = await queue.get()
                if kind == "token":
                    yield chunk(i, payload["text"])
                elif kind == "done":
                    pending.discard(i)
                    state.observe(payload)
                    yield chunk(i, finish=payload.finish_reason)
                elif kind == "error":
                    pending.discard(i)
                    status = 500
                    err = APIError(500, f"generation failed: {payload}", code="generation_failed")
                    yield "data: " + json.dumps(error_body(err)) + "\n\n"
            if opts["include_usage"]:
                yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": task,
                                             "choices": [], "usage": usage_of(reqs)}) + "\n\n"
            yield "data: [DONE]\n\n"
            state.count(task, status)
        finally:
            if pending:  # the client went away mid-stream: free its rows at the next step
                for i in pending:
                    state.engine.cancel(reqs[i].id)
                state.count(task, 499)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", guarded(metrics), methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/admin/reload", reload, methods=["POST"]),
        Route("/admin/steps", steps, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={
        404: lambda req, exc: JSONResponse(error_body(APIError(404, f"no route {req.url.path}", code="not_found")),
                                           status_code=404),
        405: lambda req, exc: JSONResponse(error_body(APIError(405, f"{req.method} is not allowed on {req.url.path}",
                                                               code="method_not_allowed")), status_code=405),
        500: lambda req, exc: JSONResponse(error_body(APIError(500, "internal server error", code="internal_error")),
                                           status_code=500),
    })
    app.state.server = state
    return _with_headers(app, headers) if headers else app


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

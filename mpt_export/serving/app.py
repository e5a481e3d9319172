"""The OpenAI-compatible HTTP layer: a thin Starlette app over :class:`~mpt_export.serving.engine.Engine`.

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
import threading
import time
import uuid
from pathlib import Path

from ..errors import InputError, MptExportError, TaskNameError
from .engine import Draining, Engine, QueueFull, Request

DEFAULT_MAX_BODY = 1 << 20
UNSUPPORTED = {"logprobs": None, "echo": False, "suffix": None, "logit_bias": None, "best_of": 1,
               "presence_penalty": 0, "frequency_penalty": 0, "tools": None, "functions": None,
               "response_format": None, "top_logprobs": None}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}


class ServerState:
    """The bundle, its session and engine, readiness, metrics — shared by the routes."""

    def __init__(self, bundle_path: str | Path, provider: str = "cpu", threads: int | None = None,
                 max_batch: int = 16, max_queue: int = 256, api_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY):
        self.bundle_path = Path(bundle_path)
        self.provider, self.threads = provider, threads
        self.max_batch, self.max_queue = max_batch, max_queue
        self.api_key = api_key or None
        self.max_body = max_body
        self.status = "loading"
        self.error: str | None = None
        self.bundle = self.session = self.engine = self.chat = None
        self._reload_lock = threading.Lock()
        self._metrics()

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Open the bundle and start the engine (runs in a worker thread while /health answers 503)."""
        from ..bundle import load_bundle
        from .chat import ChatTemplate

        try:
            self.bundle = load_bundle(self.bundle_path)
            self.session = self.bundle.session(provider=self.provider, intra_op_threads=self.threads,
                                               io_binding=False)
            self.session.tokenizer  # noqa: B018 - fail now, not on the first request
            self.chat = ChatTemplate.from_bundle(self.bundle)
            self.engine = Engine(self.session, self.max_batch, self.max_queue).start()
            self.status = "ready"
        except Exception as e:  # reported by /health and the server's log line
            self.status, self.error = "failed", str(e) if isinstance(e, MptExportError) else repr(e)

    def drain(self, timeout: float) -> bool:
        self.status = "draining"
        return self.engine.drain(timeout) if self.engine else True

    def close(self) -> None:
        if self.engine:
            self.engine.stop()
        if self.bundle:
            self.bundle.close()

    def reload(self) -> dict:
        """Re-read the bundle from disk: new and removed tasks take effect between two engine steps; requests in
        flight keep running. Refused (409) when anything but the task bank changed."""
        from ..bundle import load_bundle

        with self._reload_lock:
            new = load_bundle(self.bundle_path)
            old_files = {k: v for k, v in self.bundle.manifest["files"].items() if k != "tasks.safetensors"}
            new_files = {k: v for k, v in new.manifest["files"].items() if k != "tasks.safetensors"}
            if old_files != new_files:
                changed = sorted(k for k in set(old_files) | set(new_files) if old_files.get(k) != new_files.get(k))
                new.close()
                raise APIError(409, f"the bundle's graphs or tokenizer changed on disk ({', '.join(changed[:4])}); "
                               "a reload only takes new task vectors — restart the server to serve it",
                               code="restart_required")
            before = set(self.session.tasks)
            self.session.replace_bank(new.task_bank())
            old, self.bundle = self.bundle, new
            self.session.bundle = new
            old.close()
            after = self.session.tasks
            return {"tasks": after, "added": [t for t in after if t not in before],
                    "removed": sorted(before - set(after))}

    # -- metrics -----------------------------------------------------------------------------------------------
    def _metrics(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.m_requests = Counter("mpt_export_requests", "HTTP requests by task and status", ["task", "status"],
                                  registry=r)
        self.m_tokens = Counter("mpt_export_generated_tokens", "tokens generated", registry=r)
        Gauge("mpt_export_queue_depth", "requests waiting", registry=r).set_function(
            lambda: self.engine.queue_depth if self.engine else 0)
        Gauge("mpt_export_running_batch_size", "rows in the running batch", registry=r).set_function(
            lambda: self.engine.running if self.engine else 0)
        self.m_ttft = Histogram("mpt_export_time_to_first_token_seconds", "from submission to the first token",
                                registry=r, buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.m_tpot = Histogram("mpt_export_time_per_output_token_seconds", "mean time per token after the first",
                                registry=r, buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))

    def observe(self, req: Request) -> None:
        self.m_tokens.inc(len(req.tokens))
        if req.t_first is not None:
            self.m_ttft.observe(req.t_first - req.t_submit)
            if len(req.tokens) > 1 and req.t_done is not None:
                self.m_tpot.observe((req.t_done - req.t_first) / (len(req.tokens) - 1))

    def count(self, task: str | None, status: int) -> None:
        known = self.session is not None and task in self.session.tasks
        self.m_requests.labels(task if known else "-", str(status)).inc()


# -- request parsing -----------------------------------------------------------------------------------------------

async def read_json(request, limit: int) -> dict:
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > limit:
        raise APIError(413, f"request body of {cl} bytes exceeds the server's limit of {limit}",
                       code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body exceeds the server's limit of {limit} bytes", code="request_too_large")
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object")
    return data


def _number(data, key, default, lo=None, hi=None, integer=False, lo_open=False):
    v = data.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not float(v).is_integer()):
        raise APIError(400, f"{key} must be {'an integer' if integer else 'a number'}, got {json.dumps(v)[:40]}",
                       param=key)
    import math

    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        bounds = f"{'>' if lo_open else '>='} {lo}" if hi is None else f"in {'(' if lo_open else '['}{lo}, {hi}]"
        raise APIError(400, f"{key} must be {bounds}, got {v}", param=key)
    return int(v) if integer else float(v)


def sampling(data: dict) -> dict:
    for key, neutral in UNSUPPORTED.items():
        if key in data and data[key] not in (neutral, None):
            raise APIError(400, f"{key} is not supported by this server", param=key)
    n = data.get("n", 1)
    if n not in (1, None):
        raise APIError(400, "n must be 1: this server returns one choice per prompt", param="n")
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)
                             or len(stop) > 16):
        raise APIError(400, "stop must be a non-empty string or a list of up to 16 non-empty strings", param="stop")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false", param="stream")
    opts = data.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise APIError(400, "stream_options must be an object", param="stream_options")
    seed = data.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise APIError(400, f"seed must be an integer >= 0, got {json.dumps(seed)[:40]}", param="seed")
    return {"temperature": _number(data, "temperature", 1.0, 0, 2),  # OpenAI's default and range
            "top_p": _number(data, "top_p", 1.0, 0, 1, lo_open=True),
            "top_k": _number(data, "top_k", 0, 0, integer=True),
            "seed": seed, "stop": stop or None, "stream": stream,
            "include_usage": bool(opts.get("include_usage"))}


def _task(state: ServerState, data: dict) -> str:
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "model is required: the task to run (see GET /v1/models)", param="model")
    if model not in state.session.tasks:
        raise APIError(404, f"the model {model!r} does not exist; this bundle serves: {', '.join(state.session.tasks)}",
                       param="model", code="model_not_found")
    return model


def error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


# -- the app -------------------------------------------------------------------------------------------------------

def build_app(state: ServerState):
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

    async def health(request):
        body = {"status": state.status, **({"error": state.error} if state.error else {})}
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    async def metrics(request):
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(request):
        try:
            authorize(request)
            ready()
        except APIError as e:
            return error(e)
        created = int(state.bundle_path.stat().st_mtime) if state.bundle_path.exists() else 0
        data = [{"id": t, "object": "model", "created": created, "owned_by": "mpt-export",
                 "parent": state.bundle_path.name, "root": state.bundle_path.name} for t in state.session.tasks]
        return JSONResponse({"object": "list", "data": data})

    async def reload(request):
        try:
            authorize(request)
            ready()
            result = await asyncio.to_thread(state.reload)
        except APIError as e:
            return error(e)
        except MptExportError as e:
            return error(APIError(409, f"reload refused: {e}", code="reload_failed"))
        return JSONResponse(result)

    async def steps(request):
        try:
            authorize(request)
            ready()
        except APIError as e:
            return error(e)
        since = request.query_params.get("since", "0")
        since = int(since) if since.isdigit() else 0
        return JSONResponse({"steps": [s for s in list(state.engine.steps) if s["step"] > since],
                             "step_count": state.engine.step_count})

    async def completions(request):
        return await _generate(request, chat=False)

    async def chat_completions(request):
        return await _generate(request, chat=True)

    async def _generate(request, chat: bool):
        task = None
        try:
            authorize(request)
            ready()
            data = await read_json(request, state.max_body)
            task = _task(state, data)
            opts = sampling(data)
            tok = state.session.tokenizer
            if chat:
                if state.chat is None:
                    raise APIError(400, "this bundle's base model has no chat template, so /v1/chat/completions "
                                   "is not available; use /v1/completions", param="messages",
                                   code="chat_template_missing")
                messages = _messages(data.get("messages"))
                try:
                    prompts = [tok.encode(state.chat.render(messages), "the rendered chat", add_special_tokens=False)]
                except InputError as e:
                    raise APIError(400, str(e), param="messages") from None
            else:
                prompts = _prompts(data.get("prompt"), tok, state)
            default_max = 16 if not chat else None
            max_tokens = data.get("max_completion_tokens") if chat and "max_tokens" not in data else data.get(
                "max_tokens")
            if max_tokens is None and default_max is None:  # chat: as much as the positions allow
                max_tokens = max(1, _room(state, task, max(len(p) for p in prompts)))
            max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max, 1, integer=True)
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
            raise _api_error(e) from None
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
        usage = _usage(reqs)
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
                                             "choices": [], "usage": _usage(reqs)}) + "\n\n"
            yield "data: [DONE]\n\n"
            state.count(task, status)
        finally:
            if pending:  # the client went away mid-stream: free its rows at the next step
                for i in pending:
                    state.engine.cancel(reqs[i].id)
                state.count(task, 499)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
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
    return app


def _api_error(e) -> APIError:
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):
        return APIError(429, str(e), code="queue_full", type_="rate_limit_error", headers={"Retry-After": "1"})
    if isinstance(e, Draining):
        return APIError(503, str(e), code="draining")
    if isinstance(e, TaskNameError):
        return APIError(404, str(e), param="model", code="model_not_found")
    param = "max_tokens" if "new tokens" in str(e) or "max_new_tokens" in str(e) else "prompt"
    for key in ("temperature", "top_p", "top_k", "seed", "stop"):
        if str(e).startswith(key):
            param = key
    return APIError(400, str(e), param=param)


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(i, int) and not isinstance(i, bool) for i in x)


def _prompts(raw, tok, state: ServerState) -> list[list[int]]:
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, a list of token-id lists."""
    if isinstance(raw, str) or _is_ids(raw):
        raw = [raw]
    if not isinstance(raw, list) or not raw or len(raw) > state.max_queue or not all(
            isinstance(p, str) or _is_ids(p) for p in raw):
        raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists "
                       f"(at most {state.max_queue})", param="prompt")
    vocab = state.session.vocab_size
    out = []
    for i, p in enumerate(raw):
        if isinstance(p, str):
            try:
                out.append(tok.encode(p, f"prompt {i}"))
            except InputError as e:
                raise APIError(400, str(e), param="prompt") from None
        else:
            if not all(0 <= t < vocab for t in p):
                raise APIError(400, f"prompt {i} holds token ids outside the vocabulary [0, {vocab})", param="prompt")
            out.append(list(p))
    return out


def _room(state: ServerState, task: str, n_prompt: int) -> int:
    s = state.session
    if s.bundle.task_type == "SEQ_2_SEQ_LM":
        return s.max_positions - s.split_prompt(task)[1].shape[0] - 1
    return s.max_positions - s.prompt_len(task) - n_prompt


def _messages(raw) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a role and content", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def _usage(reqs) -> dict:
    prompt = sum(len(r.ids) for r in reqs)
    completion = sum(len(r.tokens) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

"""Completions over the scheduler, for the HTTP routes: a body read into prompts and options, one scheduler request per
prompt, then either one JSON answer once every request is done (all cancelled when the client disconnects first) or
a server-sent event stream. Also how every error is answered (OpenAI-shaped, counted in the metrics)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from ...errors import MptExportError
from ...scheduler.request import Request
from .echo import echoed, score_prompts
from .edge import disconnected
from .logprobs import chat_logprobs, completion_logprobs
from .access import access_note
from .errors import APIError, api_error, error_body
from .structured import compile_constraint
from .numbers import INT64_MAX, Bounds, check_numbers, number
from .protocol import (HTTP_DEFAULTS, answer_options, chat_prompt, prompts_of, read_json, room_for, sampling, task_of,
                       usage_of)
from .state import ServerState


def error_response(state: ServerState, e: APIError, task=None):
    """``e`` as its OpenAI-shaped answer, counted under ``task``."""
    from starlette.responses import JSONResponse

    state.count(task, e.status)
    return JSONResponse(error_body(e), status_code=e.status, headers=e.headers)


async def generate(state: ServerState, request, chat: bool):
    """``POST /v1/completions`` (``chat`` False) or ``/v1/chat/completions``: any APIError answered under the task."""
    task = None
    try:
        data = await read_json(request, state.options.max_body_bytes)
        task = task_of(state, data)
        access_note(request.scope, task=task)
        check_numbers(data, chat)
        opts = answer_options(data, chat)
        # rendering and tokenizing grow with the prompt: a worker thread does them (the tokenizer releases
        # the GIL), after a size check that needs no tokenizer
        if chat:
            prompts = await asyncio.to_thread(chat_prompt, state, data.get("messages"))
        else:
            prompts = await asyncio.to_thread(prompts_of, data.get("prompt"), state.session.tokenizer, state)
        max_tokens = _max_tokens(state, data, task, prompts, chat, opts["echo"])
        params = sampling(data, chat, max_tokens or 1)  # checked (echo alone too) before any prompt is scored
        await compile_constraint(state.session, params.constraint if max_tokens else None)
        scored = await asyncio.to_thread(score_prompts, state.session, task, prompts, params.logprobs) \
            if opts["echo"] else None
        if max_tokens == 0:  # echo alone: the prompts scored, nothing generated
            return await _echo_only(state, task, prompts, scored)
        return await _run(state, request, task, prompts, params, opts, chat, scored)
    except APIError as e:
        return error_response(state, e, task)


def _max_tokens(state: ServerState, data: dict, task, prompts, chat: bool, echo: bool = False) -> int:
    """Completions: ``max_tokens`` (:data:`HTTP_DEFAULTS`' by default; 0 with ``echo``: score the prompt only);
    chat: ``max_tokens`` or ``max_completion_tokens``, by default as many as the positions allow."""
    key = "max_completion_tokens" if chat and data.get("max_tokens") is None else "max_tokens"
    bounds = Bounds(True, 0 if echo else 1, INT64_MAX)
    max_tokens = number(data, key, None, bounds)
    if max_tokens is None:
        if not chat:
            return HTTP_DEFAULTS.max_new_tokens
        max_tokens = max(1, room_for(state, task, max(len(p) for p in prompts)))  # as much as the positions allow
    return max_tokens


def _requests(task, prompts, params, rid: str, queue: asyncio.Queue) -> list[Request]:
    """One scheduler request per prompt, each carrying the one ``params``; their events are put on ``queue`` (from the
    scheduler's thread) as ``(prompt index, kind, payload)``."""
    loop = asyncio.get_running_loop()
    reqs = []
    for i, ids in enumerate(prompts):
        def on_event(kind, payload, i=i):
            loop.call_soon_threadsafe(queue.put_nowait, (i, kind, payload))

        reqs.append(Request(task=task, ids=ids, sampling=params, seed_row=i, on_event=on_event, id=f"{rid}-{i}"))
    return reqs


def _submit(state: ServerState, reqs: list[Request]) -> None:
    """All of the requests or none: one refused cancels those already submitted."""
    try:
        for r in reqs:
            state.scheduler.submit(r)
    except (MptExportError, APIError) as e:
        for r in reqs:
            if r.t_submit:
                state.scheduler.cancel(r.id)
        raise api_error(e) from None


async def _echo_only(state: ServerState, task, prompts, scored):
    rid = "cmpl-" + uuid.uuid4().hex[:24]

    def body() -> dict:  # grows with the prompts: built in a worker thread
        tok = state.session.tokenizer
        choices = []
        for i, (p, sc) in enumerate(zip(prompts, scored)):
            text, lp = echoed(tok, p, sc, [], "", None)
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": "length"})
        n = sum(len(p) for p in prompts)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": task,
                "choices": choices, "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n}}

    content = await asyncio.to_thread(lambda: to_json(body()))
    state.count(task, 200)
    return _json(content, rid)


def to_json(body: dict) -> bytes:
    """``body`` as JSON (strict: no NaN or Infinity, which no JSON reader takes; a number that is neither is this
    request's own failure, never a 500 ``internal_error``). Called in a worker thread: a body with every prompt
    token's log-probabilities can be megabytes."""
    try:
        return json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    except ValueError:
        raise APIError(500, "generation failed: a log-probability is NaN or infinite", code="generation_failed") \
            from None


def _json(content: bytes, rid: str):
    from starlette.responses import Response

    return Response(content, media_type="application/json", headers={"X-Request-Id": rid})


async def _run(state: ServerState, request, task, prompts, params, opts, chat, scored=None):
    from starlette.responses import Response, StreamingResponse

    queue: asyncio.Queue = asyncio.Queue()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    reqs = _requests(task, prompts, params, rid, queue)
    _submit(state, reqs)
    created = int(time.time())
    if opts["stream"]:
        return StreamingResponse(_stream(state, rid, created, task, reqs, queue, opts, chat, request.scope),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Request-Id": rid})
    done = await _wait_all(state, request, reqs, queue)
    if not done:
        return Response(status_code=499)  # the client went away; its rows were freed
    failed = [r for r in reqs if r.error is not None]
    if failed:
        return error_response(state, APIError(500, f"generation failed: {failed[0].error}",
                                              code="generation_failed"), task)
    for r in reqs:
        state.observe(r)
    access_note(request.scope, tokens=sum(len(r.tokens) for r in reqs))
    # token strings, offsets, the echoed prompts and the JSON grow with the request: a worker thread builds them
    content = await asyncio.to_thread(_answer, state.session.tokenizer, rid, created, task, reqs, chat,
                                      params.logprobs is not None, prompts, scored)
    state.count(task, 200)
    return _json(content, rid)


def _answer(tok, rid, created, task, reqs, chat, logprobs: bool, prompts, scored) -> bytes:
    """The answer once every request is done, as JSON (``scored``: echo's, the prompt in front of each choice)."""
    lps = _logprobs(tok, reqs, chat) if logprobs else [None] * len(reqs)
    body = _body(rid, created, task, reqs, chat, lps)
    if scored is not None:
        for ch, p, sc, r in zip(body["choices"], prompts, scored, reqs):
            ch["text"], ch["logprobs"] = echoed(tok, p, sc, list(r.tokens), r.text, r.token_logprobs)
    return to_json(body)


def _logprobs(tok, reqs: list[Request], chat: bool) -> list[dict]:
    return [(chat_logprobs if chat else completion_logprobs)(tok, list(r.tokens), list(r.token_logprobs or []))
            for r in reqs]


def _body(rid: str, created: int, task, reqs: list[Request], chat: bool, lps: list) -> dict:
    """The answer once every request is done: a chat.completion or a text_completion."""
    usage = usage_of(reqs)
    if chat:
        r = reqs[0]
        choices = [{"index": 0, "message": {"role": "assistant", "content": r.text},
                    "logprobs": lps[0], "finish_reason": r.finish_reason}]
        return {"id": rid, "object": "chat.completion", "created": created, "model": task, "choices": choices,
                "usage": usage}
    choices = [{"index": i, "text": r.text, "logprobs": lps[i], "finish_reason": r.finish_reason}
               for i, r in enumerate(reqs)]
    return {"id": rid, "object": "text_completion", "created": created, "model": task, "choices": choices,
            "usage": usage}


async def _wait_all(state: ServerState, request, reqs, queue) -> bool:
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
        state.scheduler.cancel(r.id)
    state.count(reqs[0].task, 499)
    disconnected(request.scope, f"waiting for {reqs[0].id.rpartition('-')[0]}")
    return False


async def _stream(state: ServerState, rid, created, task, reqs, queue, opts, chat, scope):
    """The server-sent events: a chunk per token, one per finished prompt, errors, usage if asked, ``[DONE]``."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    pending = set(range(len(reqs)))
    status = 200
    tok = state.session.tokenizer
    emitted = [0] * len(reqs)  # characters streamed per prompt: the next token's text offset

    def chunk(i, text=None, finish=None, role=False, entry=None):
        lp = None
        if entry is not None:  # (token id, (log-probability, alternatives)): one token's
            t, e = entry
            lp = chat_logprobs(tok, [t], [e]) if chat else completion_logprobs(tok, [t], [e], [emitted[i]])
        if chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text or ""}
            choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": task,
                                      "choices": [choice]}) + "\n\n"

    try:
        if chat:
            yield chunk(0, role=True)
        while pending:
            i, kind, payload = await queue.get()
            if kind == "token":
                e = payload.get("logprobs")
                yield chunk(i, payload["text"], entry=(payload["token"], e) if e is not None else None)
                emitted[i] += len(payload["text"])
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
        access_note(scope, tokens=sum(len(r.tokens) for r in reqs))
        if pending:  # the client went away mid-stream: free its rows at the next step
            for i in pending:
                state.scheduler.cancel(reqs[i].id)
            state.count(task, 499)
            disconnected(scope, f"mid-stream, {rid}")

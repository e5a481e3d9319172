"""The server's access log: one line per HTTP request, written when its response has been sent (a stream: when it
ends), as uvicorn and vLLM users expect one — client, method, path, status, the task (a request's ``model``), the
tokens generated, and the milliseconds from the request to its last byte. ``text`` (the default) or ``json`` (one
object per line); off with ``serve --quiet``.

Handlers say what only they know through the request's state: ``access_note(scope, task=..., tokens=...)``."""

from __future__ import annotations

import json
import time

FORMATS = ("text", "json")


def access_note(scope, **fields) -> None:
    """Record ``fields`` (task, tokens) for this request's access line."""
    scope.setdefault("state", {}).setdefault("access", {}).update(fields)


def access_log(app, write, fmt: str = "text"):
    """``app`` with an access line per HTTP request passed to ``write`` (one string, no newline)."""

    async def logged(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        t0 = time.perf_counter()
        status = []
        scope.setdefault("state", {})  # made here: a copy of the scope further down shares it

        async def sending(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await app(scope, receive, sending)
        finally:
            write(_line(scope, status[0] if status else 499, (time.perf_counter() - t0) * 1e3, fmt))

    return logged


def _line(scope, status: int, ms: float, fmt: str) -> str:
    note = scope.get("state", {}).get("access", {})
    client = scope.get("client") or ("-", 0)
    fields = {"client": f"{client[0]}:{client[1]}", "method": scope.get("method", "-"), "path": scope.get("path", "-"),
              "status": status, "task": note.get("task"), "tokens": note.get("tokens"), "ms": round(ms, 1)}
    if fmt == "json":
        return json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields}, ensure_ascii=False)
    task = "-" if fields["task"] is None else fields["task"]
    tokens = "-" if fields["tokens"] is None else fields["tokens"]
    return (f"{fields['client']} \"{fields['method']} {fields['path']}\" {status} task={task} tokens={tokens} "
            f"{fields['ms']:.1f} ms")

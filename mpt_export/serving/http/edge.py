"""The connection edge of the server, below the routes: how long a client may take to send a request's headers, an
OpenAI-shaped 503 at the concurrency limit, and a client that goes away logged in one line.

uvicorn times out an idle keep-alive connection (``timeout_keep_alive``, armed when a response ends) and refuses
requests beyond ``limit_concurrency`` (a plain-text 503), but it has no timer for a connection whose headers never
arrive: a client trickling a request line byte by byte holds its socket (and a file descriptor) forever.
:func:`protocol_class` wraps uvicorn's own HTTP protocol class (httptools where installed, else h11) with that timer:
armed when the connection opens and at the first byte of each later request, it closes the connection unless that
request's headers were complete (uvicorn starts a new request cycle) before it fires. A request's body and answer
are never timed by it."""

from __future__ import annotations

import json
import logging

from .errors import APIError, error_body

log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: one line on standard error, as its warnings


def protocol_class(header_timeout: float):
    """uvicorn's HTTP protocol class with a ``header_timeout`` (seconds) for a request's headers, and the concurrency
    limit's 503 OpenAI-shaped (the httptools protocol; h11's keeps uvicorn's plain-text one)."""
    from uvicorn.protocols.http import flow_control
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class EdgeProtocol(AutoHTTPProtocol):
        _header_timer = None
        _timed = None  # the cycle that was the latest when the timer was armed (None: the connection's first request)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            # a request's first byte after the previous answer: its headers are due within header_timeout (an idle
            # keep-alive connection is uvicorn's timeout_keep_alive's)
            between = self.cycle is None or self.cycle.response_complete
            if between and (self._header_timer is None or self._timed is not self.cycle):
                self._arm()
            super().data_received(data)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._timed = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._headers_overdue)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            """No request's headers completed since the timer was armed (uvicorn makes a new cycle for each)."""
            self._header_timer = None
            if self.cycle is self._timed and not self.transport.is_closing():
                self.transport.close()

        def _start_asgi_task(self, cycle, app) -> None:  # httptools: where a request's app starts
            if app is flow_control.service_unavailable:
                app = busy
            super()._start_asgi_task(cycle, app)

    return EdgeProtocol


async def busy(scope, receive, send) -> None:
    """The answer beyond ``--limit-concurrency``: 503 ``server_busy``, OpenAI-shaped; the connection closes."""
    body = json.dumps(error_body(APIError(
        503, "the server is at its concurrency limit (--limit-concurrency connections or requests); retry shortly",
        code="server_busy"))).encode()
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def quiet_disconnects(app):
    """An ASGI wrapper: a request whose client went away (mid-body, mid-stream) ends with one log line naming the
    client and the route, not uvicorn's "Exception in ASGI application" traceback."""
    from starlette.requests import ClientDisconnect

    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        gone = []

        async def receive_noting():
            message = await receive()
            if message["type"] == "http.disconnect":
                gone.append(True)
            return message

        try:
            await app(scope, receive_noting, send)
        except (ClientDisconnect, OSError) as e:
            disconnected(scope, type(e).__name__)
        except Exception as e:
            if not gone:
                raise
            disconnected(scope, type(e).__name__)

    wrapped.state = getattr(app, "state", None)
    return wrapped


def disconnected(scope, how: str = "") -> None:
    """One log line: a client went away before its answer was whole."""
    client = scope.get("client") or ("?", 0)
    log.warning("client %s:%s disconnected before the answer to %s %s was complete%s", client[0], client[1],
                scope.get("method"), scope.get("path"), f" ({how})" if how else "")

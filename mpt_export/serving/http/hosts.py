"""The Host allow-list: a defence against DNS rebinding, where a web page's own name is pointed at 127.0.0.1 so the
visitor's browser sends requests (and reads the answers) to a server on the visitor's machine. Such requests carry
the attacker's name in ``Host``; a server that answers only to the names it is reached by refuses them.

Allowed by default: the loopback names (``localhost``, ``127.0.0.1``, ``::1``) and the ``--host`` the server listens
on, with any port; ``--allowed-host NAME`` (repeatable) adds a name; ``--allowed-host '*'`` allows any (behind a proxy
that checks ``Host`` itself). Listening on every interface (``--host 0.0.0.0`` or ``::``) names no host a client
sends, so there the server allows any ``Host`` unless ``--allowed-host`` names some, and says so when it starts.
A refused request gets 400 ``host_not_allowed``, OpenAI-shaped, naming the option to use."""

from __future__ import annotations

import json

from ...errors import OptionError
from .errors import APIError, error_body

LOOPBACK = ("localhost", "127.0.0.1", "::1")
WILDCARDS = ("0.0.0.0", "::", "")  # listen on every interface


def allow_list(host: str, allowed: tuple[str, ...]) -> frozenset[str] | None:
    """The names ``Host`` may carry (lower case, without port or brackets), or None for any."""
    if "*" in allowed or (host in WILDCARDS and not allowed):
        return None
    names = {*LOOPBACK, *allowed} | ({host} if host not in WILDCARDS else set())
    return frozenset(name_of(n) for n in names)


def check_allowed(allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``--allowed-host`` values: names or addresses (a port is ignored), or ``*`` alone."""
    for a in allowed:
        if not isinstance(a, str) or not a.strip() or any(c.isspace() or c in "/,@" for c in a):
            raise OptionError(f"--allowed-host {a!r} is not a host name or address; give one name per option "
                              "(--allowed-host example.com --allowed-host 10.0.0.5), or '*' for any", param="allowed_hosts")
    return tuple(allowed)


def name_of(host: str) -> str:
    """A ``Host`` header's name: lower case, without the port, an IPv6 address without brackets."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (more colons: a bare IPv6 address)
        host = host.partition(":")[0]
    return host.rstrip(".")


def host_guard(app, allowed: frozenset[str]):
    """An ASGI wrapper: a request whose ``Host`` is not in ``allowed`` gets 400 ``host_not_allowed``."""

    async def wrapped(scope, receive, send):
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), None)
            if host is not None and name_of(host) not in allowed:
                return await _refuse(host, send)
        return await app(scope, receive, send)

    wrapped.state = getattr(app, "state", None)
    return wrapped


async def _refuse(host: str, send) -> None:
    shown = host if len(host) <= 100 else host[:100] + "…"
    body = json.dumps(error_body(APIError(
        400, f"Host {shown!r} is not allowed (a defence against DNS rebinding): this server answers to the names it "
        f"was started for; to serve clients that reach it by this name, start it with --allowed-host "
        f"{name_of(host)[:100]} (or --allowed-host '*' behind a proxy that checks Host)", code="host_not_allowed"))).encode()
    await send({"type": "http.response.start", "status": 400, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

"""The server process: uvicorn over :func:`~mpt_export.serving.http.app.build_app`, with our own signal handling.

- The bundle is opened once (its manifest checked), then the socket is bound (``--port 0`` picks a free port; the
  real one is printed), then that same bundle is verified (every file's sha256) and loaded in a worker thread while
  ``/health`` answers 503; a bundle that fails its checks stops the server with one ``error:`` line.
- SIGTERM / SIGINT: ``/health`` turns 503 and new ``/v1`` calls get 503, uvicorn stops accepting connections and
  waits for the requests in flight (streams included) up to ``drain_timeout``; then the scheduler finishes what is left
  within the same budget, and the process exits 0. A second SIGINT stops at once.
- SIGHUP: reload the bundle's tasks from disk (as ``POST /admin/reload``).

``MPT_EXPORT_SERVE_LOAD_DELAY`` (seconds) delays the load, so tests can watch ``/health`` answer 503 while loading.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time

from ...errors import InputError, MissingDependencyError
from .access import access_log
from .app import build_app
from .edge import protocol_class
from .options import ServeOptions
from .errors import APIError
from .state import ServerState
from ...bundle.reader import load_bundle
from ...bundle.taskbank import name_list


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise InputError(f"port {port} on {host} is in use: another server is listening there (an earlier "
                             "`mpt-export serve`?); stop it, or choose another --port (0: a free one)") from None
        raise InputError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(bundle: str, options: ServeOptions | None = None, log=None, started: float | None = None) -> int:
    """Run the server until a signal stops it. -> exit code (0 after a drain). ``started``: the
    ``time.perf_counter()`` its "ready" figure counts from (the command's start; default: this call's)."""
    started = time.perf_counter() if started is None else started
    o = options or ServeOptions()
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))

    # opened once: a wrong path or a damaged manifest fails now, before listening; its files are hashed while
    # /health answers 503 (ServerState.load verifies this same Bundle — the directory it holds — and serves it)
    opened = load_bundle(bundle, verify=False)
    try:
        o.check_aliases(set(opened.tasks))
        uvicorn = _import_uvicorn()
    except BaseException:
        opened.close()
        raise
    state = ServerState(bundle, o, opened=opened)
    app = build_app(state, identity={"pid": os.getpid()})  # /health names the process: a wait loop knows its own
    if o.access_log:
        app = access_log(app, say, o.log_format)
    host, drain_timeout = o.host, o.drain_timeout
    sock = bind(host, o.port)
    actual = sock.getsockname()[1]
    server = _server(uvicorn, app, o)
    stopped_at: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        _handle_signals(loop, server, state, stopped_at, drain_timeout, say)
        _load_in_background(loop, server, state, f"{bundle} on http://{host}:{actual}", say, started)
        say(f"listening on http://{host}:{actual} (loading {bundle})")
        if o.host_allow_list is None and not o.allowed_hosts:
            say(f"note: listening on every interface ({host}) with no --allowed-host: any Host header is answered; "
                "name the host names clients use (--allowed-host NAME) to refuse the others (DNS rebinding)")
        await server.serve(sockets=[sock])

    # The scheduler thread and the event loop share the GIL: a short switch interval lets the scheduler take it back
    # soon after each graph call instead of waiting out the loop's 5 ms slice.
    sys.setswitchinterval(0.0005)
    try:
        _run(main)
    finally:
        drained = _drain(state, stopped_at, drain_timeout)
        sock.close()
    if not drained:
        say("drain timeout: requests still running were cancelled")
    return 0 if state.status != "failed" else 1


def _import_uvicorn():
    try:
        import uvicorn
    except ImportError:
        raise MissingDependencyError("serving needs the serve extra: pip install 'mpt-export[serve]'") from None
    return uvicorn


def _server(uvicorn, app, o: ServeOptions):
    """A uvicorn server for ``app`` that leaves the signals to us, waits up to ``o.drain_timeout`` for requests in
    flight when it stops, and holds the connection limits (headers within ``o.header_timeout``, idle keep-alive
    connections closed after ``o.keep_alive_timeout``, ``o.limit_concurrency``: see edge.py)."""

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # ours are installed by _handle_signals (uvicorn's re-raise the signal at exit)
            yield

        def install_signal_handlers(self) -> None:  # older uvicorn releases
            pass

    drain = o.drain_timeout
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", server_header=False,
                            timeout_graceful_shutdown=max(1, int(drain)) if drain else None,
                            http=protocol_class(o.header_timeout), timeout_keep_alive=o.keep_alive_timeout,
                            limit_concurrency=o.limit_concurrency)
    return Server(config)


def _handle_signals(loop, server, state: ServerState, stopped_at: list[float], drain_timeout: float, say) -> None:
    """SIGTERM/SIGINT: drain (a second SIGINT stops at once; ``stopped_at`` gets the time of the first signal).
    SIGHUP: reload the bundle's tasks."""

    def stop(sig):
        if stopped_at and sig == signal.SIGINT:
            server.force_exit = True
            return
        if not stopped_at:
            stopped_at.append(time.monotonic())
            say(f"{signal.Signals(sig).name}: draining (finishing requests in flight, up to {drain_timeout:g} s)")
            state.status = "draining"
        server.should_exit = True

    async def reload():
        try:
            result = await asyncio.to_thread(state.reload)
            say(f"reloaded: {len(result['tasks'])} tasks ({name_list(result['tasks'])})")
        except (APIError, Exception) as e:  # a refused reload keeps serving the bundle it has
            say(f"reload refused: {getattr(e, 'message', e)}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop, sig)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))


def _load_in_background(loop, server, state: ServerState, where: str, say, started: float) -> None:
    """Load the bundle in a worker thread; then say where it is served (``where``), or stop the server if it failed."""

    def loaded(_):
        if state.status == "ready":
            packed = getattr(state.session, "prepacked", None)
            weights = "" if packed is None else (" (weights prepacked)" if packed else
                                                 " (weights read in place, not prepacked)")
            if getattr(state.session, "graph", "plain") == "fast":
                weights += " (fused graph)"
            say(f"serving {where}{weights} — {len(state.session.tasks)} tasks: {name_list(state.session.tasks)} (ready "
                f"{time.perf_counter() - started:.1f} s after the command started)")
        elif state.status == "failed":
            say(f"error: {state.error}")
            server.should_exit = True

    def load():
        delay = float(os.environ.get("MPT_EXPORT_SERVE_LOAD_DELAY", "0") or 0)  # test hook: a slow load
        if delay > 0:
            time.sleep(delay)
        state.load()

    loop.run_in_executor(None, load).add_done_callback(lambda f: loop.call_soon_threadsafe(loaded, f))


def _run(main) -> None:
    """Run the coroutine function ``main`` to completion, on uvloop where it is installed."""
    try:
        import uvloop  # optional ([serve] installs it on Linux/macOS): a faster event loop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())


def _drain(state: ServerState, stopped_at: list[float], drain_timeout: float) -> bool:
    """Let the scheduler finish what is left within what remains of the drain budget, then close the state.
    -> whether everything finished."""
    left = drain_timeout - (time.monotonic() - stopped_at[0]) if stopped_at else 0
    drained = state.drain(max(left, 0.0)) if state.scheduler else True
    state.close()
    return drained

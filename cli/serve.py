from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ._common import handle_errors


KEY_ENV = "MPT_EXPORT_API_KEY"


def _api_key(option: str | None, env: str | None) -> str | None:
    """The key to require (--api-key, else the environment), or None for no key. A key that would not protect the
    server, or that no client could send, is refused: empty or only whitespace (which would turn auth off without a word),
    with whitespace around it (HTTP strips it from the header, so no request would match), or with characters a
    header cannot carry (control characters, non-ASCII)."""
    from mpt_export.errors import InputError

    where, key = ("--api-key", option) if option is not None else (KEY_ENV, env)
    if key is None:
        return None
    off = f"to serve without a key, omit --api-key and unset {KEY_ENV}"
    if not key.strip():
        raise InputError(f"{where} is {'empty' if not key else 'only whitespace'}; an API key must be a non-empty "
                         f"string (the one clients send); {off}")
    if key != key.strip():
        raise InputError(f"{where} begins or ends with whitespace, which HTTP strips from the Authorization header, "
                         f"so no client could send it; pass the key without it ({off})")
    if not all(" " <= c <= "~" for c in key):
        raise InputError(f"{where} holds a character an HTTP header cannot carry (a control character or non-ASCII); "
                         f"use printable ASCII ({off})")
    return key


@handle_errors
def serve_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to serve (every task is a model).")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed at start).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together at most (continuous batching across tasks).")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; beyond it new ones get 429 with Retry-After.")] = 256,
    api_key: Annotated[str | None, typer.Option(help="Require Authorization: Bearer KEY on /v1 and /admin (default: env MPT_EXPORT_API_KEY; a key must be non-empty printable ASCII — omit both to serve without one).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: one per core).")] = None,
    prepack: Annotated[bool | None, typer.Option("--prepack/--no-prepack", help="ONNX Runtime CPU: packed copies of the MatMul weights at start — faster steps, but a second copy of the weights in memory and ~1.5 s of start-up per GB (default: only where both copies fit in available memory).")] = None,
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider: cpu, cuda or a provider name.")] = "cpu",
    drain_timeout: Annotated[float, typer.Option(help="On SIGTERM/SIGINT: seconds to finish the requests in flight before exiting.")] = 30.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    ray: Annotated[bool, typer.Option("--ray", help="Serve through Ray Serve replicas (each one this server's engine; needs the ray extra).", rich_help_panel="Ray Serve")] = False,
    replicas: Annotated[int | None, typer.Option(help="With --ray: a fixed number of replicas (default 1).", rich_help_panel="Ray Serve")] = None,
    autoscale: Annotated[str | None, typer.Option(help="With --ray: MIN:MAX replicas, scaled on ongoing requests (one full batch per replica).", rich_help_panel="Ray Serve")] = None,
    ray_address: Annotated[str | None, typer.Option(help="With --ray: join this Ray cluster ('auto': the one `ray start` runs on this node); default: start a local Ray instance that stops with this command.", rich_help_panel="Ray Serve")] = None,
) -> None:
    """Serve a bundle over HTTP with OpenAI-compatible routes; requests for any task share the backbone's batches."""
    from mpt_export.errors import InputError
    from mpt_export.serving.server import serve

    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {port}")
    if max_batch < 1 or max_queue < 1 or max_body_bytes < 1:
        raise InputError("--max-batch, --max-queue and --max-body-bytes must be >= 1")
    key = _api_key(api_key, os.environ.get(KEY_ENV))
    if not ray and (replicas is not None or autoscale is not None or ray_address is not None):
        raise InputError("--replicas, --autoscale and --ray-address only apply with --ray")
    if ray:
        from mpt_export.serving.ray_serve import serve_ray

        raise typer.Exit(serve_ray(str(bundle), host=host, port=port, replicas=replicas, autoscale=autoscale,
                                   address=ray_address, max_batch=max_batch, max_queue=max_queue, api_key=key,
                                   threads=threads, provider=provider, drain_timeout=drain_timeout,
                                   max_body=max_body_bytes, prepack="auto" if prepack is None else prepack))
    raise typer.Exit(serve(str(bundle), host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=key,
                           threads=threads, provider=provider, drain_timeout=drain_timeout, max_body=max_body_bytes,
                           prepack="auto" if prepack is None else prepack))

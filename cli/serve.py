from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ._common import handle_errors




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
    from mpt_export.serving.http.server import serve

    if not 0 <= port <= 65535:
        raise InputError(f"--port must be in [0, 65535], got {port}")
    if max_batch < 1 or max_queue < 1 or max_body_bytes < 1:
        raise InputError("--max-batch, --max-queue and --max-body-bytes must be >= 1")
    from mpt_export.serving.http.protocol import KEY_ENV, api_key_of

    key = api_key_of(api_key, os.environ.get(KEY_ENV))
    if not ray and (replicas is not None or autoscale is not None or ray_address is not None):
        raise InputError("--replicas, --autoscale and --ray-address only apply with --ray")
    if ray:
        from mpt_export.serving.ray.service import serve_ray

        raise typer.Exit(serve_ray(str(bundle), host=host, port=port, replicas=replicas, autoscale=autoscale,
                                   address=ray_address, max_batch=max_batch, max_queue=max_queue, api_key=key,
                                   threads=threads, provider=provider, drain_timeout=drain_timeout,
                                   max_body=max_body_bytes, prepack="auto" if prepack is None else prepack))
    raise typer.Exit(serve(str(bundle), host=host, port=port, max_batch=max_batch, max_queue=max_queue, api_key=key,
                           threads=threads, provider=provider, drain_timeout=drain_timeout, max_body=max_body_bytes,
                           prepack="auto" if prepack is None else prepack))

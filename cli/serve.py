from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from ._common import STARTED, handle_errors
from mpt_export.errors import InputError
from mpt_export.serving.http.options import ServeOptions
from mpt_export.serving.http.protocol import api_key_of, KEY_ENV
from mpt_export.serving.http.server import serve
from mpt_export.serving.ray.service import serve_ray


@handle_errors
def serve_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory to serve (every task is a model).")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (0: a free one, printed at start).")] = 8000,
    max_batch: Annotated[int, typer.Option(help="Rows decoded together at most (continuous batching across tasks).")] = 16,
    max_queue: Annotated[int, typer.Option(help="Requests waiting at most; beyond it new ones get 429 with Retry-After.")] = 256,
    api_key: Annotated[str | None, typer.Option(help="Require Authorization: Bearer KEY on /v1 and /admin (a key: non-empty printable ASCII).", show_default="env MPT_EXPORT_API_KEY; omit both to serve without a key")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.", show_default="one per core")] = None,
    prepack: Annotated[bool | None, typer.Option("--prepack/--no-prepack", help="ONNX Runtime CPU: packed copies of the MatMul weights at start — faster steps, but a second copy of the weights in memory and ~1.5 s of start-up per GB.", show_default="where both copies fit in available memory")] = None,
    provider: Annotated[str, typer.Option(metavar="cpu|cuda|tensorrt|dml|coreml|NAME", help="ONNX Runtime provider: cpu, cuda, tensorrt (ONNX Runtime's TensorRT execution provider), dml, coreml or an ONNX Runtime provider name. Schedulers from `mpt-export build` are served by `triton --backend tensorrt`.")] = "cpu",
    graph: Annotated[str, typer.Option(metavar="auto|fast|plain", help="Causal bundles on ONNX Runtime: fast (the fused graph), plain (the traced one), or auto: the fused graph where the bundle has one and the provider is the CPU.")] = "auto",
    drain_timeout: Annotated[float, typer.Option(help="On SIGTERM/SIGINT: seconds to finish the requests in flight before exiting.")] = 30.0,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body accepted (413 beyond).")] = 1 << 20,
    allowed_host: Annotated[list[str] | None, typer.Option(metavar="NAME", help="A Host name clients may use besides the loopback names and --host (repeatable; a defence against DNS rebinding: other Host headers get 400). '*': any, behind a proxy that checks Host, or with --host 0.0.0.0 (where any Host is answered unless this names some).", show_default="localhost, 127.0.0.1, ::1 and --host")] = None,
    header_timeout: Annotated[float, typer.Option(help="Seconds a client has to send a request's headers; a connection that has not by then is closed.")] = 30.0,
    keep_alive_timeout: Annotated[float, typer.Option(help="Seconds an idle keep-alive connection stays open.")] = 5.0,
    limit_concurrency: Annotated[int | None, typer.Option(help="Connections and requests at once at most; beyond, 503 server_busy (keep it below the descriptor limit, ulimit -n).", show_default="no limit")] = None,
    task_dir: Annotated[list[Path] | None, typer.Option("--task-dir", metavar="DIR", help="A directory adapters may be loaded from into the running server (POST /admin/tasks; repeatable). Without it, loading tasks over HTTP is off.", show_default="off")] = None,
    kv_cache_mib: Annotated[float, typer.Option(help="Memory for each task's prompt keys/values, kept between requests so a request to a recent task skips its virtual tokens (MiB; least recently used evicted first; 0: none kept). A task takes 2 x layers x virtual tokens x KV heads x head size x 4 bytes; /metrics counts hits and misses.")] = ServeOptions.kv_cache_mib,
    task_alias: Annotated[list[str] | None, typer.Option("--task-alias", metavar="ALIAS=TASK", help="Serve TASK under the model name ALIAS too (repeatable; listed by /v1/models with the task as its parent).")] = None,
    default_task: Annotated[str | None, typer.Option(metavar="TASK", help="What a request without a model runs (a task or an alias).", show_default="none: every request names its model")] = None,
    log_format: Annotated[str, typer.Option(metavar="text|json", help="The access log's lines (one per request on standard error, when its response has been sent: client, method, path, status, task, tokens generated, milliseconds): text, or json (an object per line). Without --ray (Ray Serve logs requests its own way).")] = "text",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No access log (start-up lines and errors still print).")] = False,
    ray: Annotated[bool, typer.Option("--ray", help="Serve through Ray Serve replicas (each one this server's scheduler; needs the ray extra).", rich_help_panel="Ray Serve")] = False,
    replicas: Annotated[int | None, typer.Option(help="With --ray: a fixed number of replicas.", show_default="1", rich_help_panel="Ray Serve")] = None,
    autoscale: Annotated[str | None, typer.Option(help="With --ray: MIN:MAX replicas, scaled on ongoing requests (one full batch per replica).", rich_help_panel="Ray Serve")] = None,
    ray_address: Annotated[str | None, typer.Option(help="With --ray: join this Ray cluster ('auto': the one `ray start` runs on this node).", show_default="a local Ray instance that stops with this command", rich_help_panel="Ray Serve")] = None,
) -> None:
    """Serve a bundle over HTTP with OpenAI-compatible routes; requests for any task share the backbone's batches."""
    if not ray and (replicas is not None or autoscale is not None or ray_address is not None):
        raise InputError("--replicas, --autoscale and --ray-address only apply with --ray")
    options = ServeOptions(host=host, port=port, max_batch=max_batch, max_queue=max_queue,
                           api_key=api_key_of(api_key, os.environ.get(KEY_ENV)), threads=threads, provider=provider,
                           drain_timeout=drain_timeout, max_body_bytes=max_body_bytes, prepack=prepack, graph=graph,
                           allowed_hosts=tuple(allowed_host or ()), header_timeout=header_timeout,
                           keep_alive_timeout=keep_alive_timeout, limit_concurrency=limit_concurrency,
                           task_dirs=tuple(str(d) for d in task_dir or ()), kv_cache_mib=kv_cache_mib,
                           access_log=not quiet, log_format=log_format, task_aliases=tuple(task_alias or ()),
                           default_task=default_task)
    if ray:
        raise typer.Exit(serve_ray(str(bundle), options, replicas=replicas, autoscale=autoscale, address=ray_address,
                                   started=STARTED))

    raise typer.Exit(serve(str(bundle), options, started=STARTED))

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import Quiet, console, escape, handle_errors, human, progress
from mpt_export.serving.triton.writer import write_repository


@handle_errors
def triton_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    out: Annotated[Path, typer.Option(help="Model repository to write (give it to tritonserver --model-repository).")],
    backend: Annotated[str, typer.Option(help="Graph models as onnxruntime (model.onnx) or tensorrt (model.plan, from --engines).")] = "onnxruntime",
    engines: Annotated[Path | None, typer.Option(help="With --backend tensorrt: the folder `mpt-export build` wrote for this bundle (on the GPU Triton runs on).")] = None,
    max_batch: Annotated[int, typer.Option(help="max_batch_size of the graph models, and rows the generation engine batches at most.")] = 8,
    instances: Annotated[int, typer.Option(help="Instances of each graph model (instance_group count).")] = 1,
    kind: Annotated[str, typer.Option(help="Where the graph models run: cpu (KIND_CPU) or gpu (KIND_GPU).")] = "cpu",
    max_queue: Annotated[int, typer.Option(help="Requests waiting per model at most (dynamic_batching default_queue_policy.max_queue_size; the engine's queue).")] = 256,
    graph_calls: Annotated[str | None, typer.Option(help="How the generation model runs the graphs: onnxruntime (in its own process; default for --backend onnxruntime) or bls (through Triton's graph models; default for --backend tensorrt).")] = None,
    prefix: Annotated[str, typer.Option(help="Prefix for the model names: one Triton can serve the repositories of several bundles (one --model-repository each) when their model names differ.")] = "",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is a repository this tool wrote.")] = False,
    quiet: Quiet = False,
) -> None:
    """Write a Triton Inference Server model repository: the graphs as ONNX Runtime or TensorRT models, and a
    decoupled Python-backend model `generate` that batches every task together and streams tokens."""
    with progress("triton", quiet) as on_step:
        on_step("write the repository (the graphs copied, cloned or linked)")
        r = write_repository(bundle, out, backend=backend, engines=engines, max_batch=max_batch, instances=instances,
                             kind=kind, max_queue=max_queue, prefix=prefix, graph_calls=graph_calls, force=force)
    files = (f"{r['copied']} files copied ({r['bytes'] / 2**20:,.0f} MiB), {r['cloned']} cloned (copy-on-write), "
             f"{r['linked']} hard links between the repository's models")
    console.print(f"[green]wrote[/] {escape(r['out'])}: models {escape(', '.join(r['models']))} "
                  f"({r['backend']} graphs; generate runs them through {r['graph_calls']}); {files}")
    console.print(escape("start: " + " ".join(r["start"])), soft_wrap=True)  # one line to copy, never wrapped
    if r["kv_step_bytes"]:
        need = 2 * r["kv_step_bytes"]
        console.print(escape(f"BLS moves each decode step's KV ({human(r['kv_step_bytes'])} at --max-batch, in and "
                             f"out) through /dev/shm: in a container give it room, e.g. docker run "
                             f"--shm-size={max(need * 2 // 2**20, 64)}m"), soft_wrap=True)

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import Quiet, console, escape, handle_errors, parity_table, progress, quiet_libraries, size_table
from mpt_export.errors import InputError
from mpt_export.storage.ownership import check_replaceable
from mpt_export.tools.demo import ARCHS, run_demo
from mpt_export.bundle.taskbank import name_list


@handle_errors
def demo_cmd(
    workdir: Annotated[Path, typer.Option(help="Where the tiny base model, the adapters and the bundle are written (replaced when an earlier demo made it; any other non-empty directory is refused).")] = Path("build/demo"),
    arch: Annotated[str, typer.Option(help="Base model family: llama, llama-gqa, mistral, qwen2, gpt2, t5 (v1.0), flan-t5 (v1.1).")] = "llama-gqa",
    quiet: Quiet = False,
) -> None:
    """Build a tiny base model and PEFT MPT adapters in code (3-task source + target), export, validate, report."""
    if arch not in ARCHS:
        raise InputError(f"unknown --arch {arch!r}; choose one of: {', '.join(ARCHS)}")
    check_replaceable(workdir, "demo-workdir", force=True)  # refuse a directory it did not make before loading torch
    quiet_libraries()
    with progress("demo", quiet) as on_step:
        r = run_demo(workdir, arch=arch, on_step=on_step)
    b = r["bundle"]
    console.print(parity_table(b.info.validation))
    console.print(size_table(b))
    console.print(f"built inputs in {r['build_s']:.1f}s; export + validation in {r['export_s']:.1f}s "
                  f"(graph export {b.info.timings['graph_export_s']}s, validation "
                  f"{b.info.timings.get('validate_s', 0)}s)")
    t = Table(title=escape(f"one backbone, every task: greedy continuation of {r['prompt']!r}"), title_justify="left")
    t.add_column("task")
    t.add_column("text")
    for task, text in r["outputs"].items():
        t.add_row(escape(task), escape(repr(text)))
    t.add_row("rte-copy (added at runtime)", escape(repr(r["added_output"])))
    console.print(t)
    console.print(f"adding a task at runtime: {r['task_bytes']} bytes of vectors, {r['add_task_ms']:.0f} ms from "
                  "add_task to its first 16 generated tokens (composer + first request), no re-export")
    console.print(f"[green]bundle[/] {escape(str(b.path))}  tasks: {escape(name_list(b.tasks))}")
    console.print(next_steps(workdir), soft_wrap=True)  # commands to copy: never wrapped


def next_steps(workdir: Path) -> str:
    """What to try on the bundle just made (the paths as the user typed them)."""
    w = escape(shlex.quote(str(workdir)))
    return "\n".join([
        "[bold]next[/] (the README's \"After the demo\"; docs/quickstart.md explains each step):",
        f"  mpt-export generate {w}/bundle --task sst2 \"the movie was\"",
        f"  mpt-export serve {w}/bundle --port 8000 &",
        "  timeout 60 bash -c 'until curl -sf http://localhost:8000/health > /dev/null; do sleep 0.2; done'",
        "  curl -s http://localhost:8000/v1/completions -H 'Content-Type: application/json' \\",
        "       -d '{\"model\": \"mnli\", \"prompt\": \"the premise\", \"max_tokens\": 16, \"temperature\": 0}'",
        f"  mpt-export tasks add {w}/bundle --adapter rte-v2={w}/adapters/target   # a task added, no re-export",
    ])

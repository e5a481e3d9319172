from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, escape, handle_errors, human
from mpt_export.export.task_edits import add_tasks, remove_task

app = typer.Typer(help="List, add or remove tasks in a bundle — vectors only: no re-export, the backbone is untouched.",
                  no_args_is_help=True)


@app.command("list")
@handle_errors
def list_cmd(bundle: Annotated[Path, typer.Argument(help="Bundle directory.")]) -> None:
    """The bundle's tasks: prompt length, rank, bytes, shared prompt and source."""
    import mpt_export

    b = mpt_export.load_bundle(bundle)
    t = Table(title=escape(f"{b.path}: {len(b.tasks)} tasks"), title_justify="left")
    for col in ("task", "prompt len", "rank", "bytes", "shared prompt", "source"):
        t.add_column(col)
    for x in b.info.tasks:
        t.add_row(x.name, str(x.prompt_len), str(x.rank), human(x.bytes or 0), str(x.shared_prompt),
                  escape(x.source or ""))
    console.print(t)


@app.command("add")
@handle_errors
def add_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    adapter: Annotated[list[str], typer.Option("--adapter", metavar="[NAMES=]DIR", help="A PEFT MPT adapter trained on the bundle's base model: a directory or a Hugging Face Hub id (org/name[@REVISION]). Repeatable.")],
) -> None:
    """Add the tasks of MPT adapters to a bundle (rewrites tasks.safetensors and the manifest atomically)."""
    b = add_tasks(bundle, adapter)
    console.print(f"[green]added[/] {escape(', '.join(b.added_tasks))}; tasks: {escape(', '.join(b.tasks))}")


@app.command("remove")
@handle_errors
def remove_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    name: Annotated[str, typer.Argument(help="Task to remove.")],
) -> None:
    """Remove a task (its shared prompt goes too when no other task uses it)."""
    b = remove_task(bundle, name)
    console.print(f"[green]removed[/] {escape(name)}; tasks: {escape(', '.join(b.tasks))}")


from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, escape, handle_errors, human, read_text_option
from mpt_export.bundle.taskbank import name_list
from mpt_export.errors import InputError
from mpt_export.export.task_edits import add_tasks, remove_task

app = typer.Typer(help="List, add or remove tasks in a bundle — vectors only: no re-export, the backbone is untouched.",
                  no_args_is_help=True)


@app.command("list")
@handle_errors
def list_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    match: Annotated[str | None, typer.Option("--match", metavar="GLOB", help="Only tasks whose name matches this shell pattern (e.g. 'sst*', '*-v2').")] = None,
    limit: Annotated[int, typer.Option(help="Show at most this many tasks (0: all).")] = 100,
    offset: Annotated[int, typer.Option(help="Skip this many matching tasks first (the next page: --offset 100).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per task (name, prompt_len, rank, bytes, shared_prompt, source), for scripts.")] = False,
) -> None:
    """The bundle's tasks: prompt length, rank, bytes, shared prompt and source — a page at a time."""
    import mpt_export

    if limit < 0 or offset < 0:
        raise InputError(f"--limit and --offset must be >= 0, got {limit} and {offset}")
    b = mpt_export.load_bundle(bundle, verify=False)  # the task files' index: `mpt-export verify` checks the rest
    entries = [x for x in b.info.tasks if match is None or fnmatch.fnmatchcase(x.name, match)]
    page = entries[offset:offset + limit] if limit else entries[offset:]
    if as_json:
        for x in page:
            print(json.dumps({"name": x.name, "prompt_len": x.prompt_len, "rank": x.rank, "bytes": x.bytes,
                              "shared_prompt": x.shared_prompt, "source": x.source}))
        return
    what = f"{len(entries)} of {len(b.tasks)} tasks match {match!r}" if match is not None else f"{len(b.tasks)} tasks"
    t = Table(title=escape(f"{b.path}: {what}"), title_justify="left")
    for col in ("task", "prompt len", "rank", "bytes", "shared prompt", "source"):
        t.add_column(col)
    for x in page:
        t.add_row(escape(x.name), str(x.prompt_len), str(x.rank), human(x.bytes or 0), str(x.shared_prompt),
                  escape(x.source or ""))
    console.print(t)
    if len(page) < len(entries):
        shown = f"{offset + 1}-{offset + len(page)}" if page else "none"
        console.print(f"showing {shown} of {len(entries)}; --offset {offset + len(page)} for the next page, "
                      "--limit 0 for all, --match GLOB to filter")


@app.command("add")
@handle_errors
def add_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    adapter: Annotated[list[str], typer.Option("--adapter", metavar="[NAMES=]DIR", help="A PEFT MPT adapter trained on the bundle's base model: a directory or a Hugging Face Hub id (org/name[@REVISION]). Repeatable.")],
    names_file: Annotated[Path | None, typer.Option("--names-file", help="The task names for a many-task adapter, one per line, as many as it has tasks (with one --adapter DIR, no NAMES=).")] = None,
) -> None:
    """Add the tasks of MPT adapters to a bundle (rewrites tasks.safetensors and the manifest atomically)."""
    if names_file is not None:
        adapter = [_named_from_file(adapter, names_file)]
    b = add_tasks(bundle, adapter)
    added = b.added_tasks
    what = f"{len(added)} tasks: {name_list(added, 10)}" if len(added) > 1 else name_list(added)
    console.print(f"[green]added[/] {escape(what)}; the bundle has {len(b.tasks)} task(s)")


def _named_from_file(adapter: list[str], names_file: Path) -> str:
    """``--adapter DIR --names-file FILE`` as the ``NAMES=DIR`` spec it stands for."""
    if len(adapter) != 1 or "=" in adapter[0]:
        raise InputError("--names-file names the tasks of one adapter: give exactly one --adapter DIR, without NAMES=")
    text = read_text_option(names_file, "--names-file", ", one task name per line")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"--names-file {names_file} holds no names; give one task name per line")
    bad = [n for n in names if "," in n or "=" in n]
    if bad:
        raise InputError(f"--names-file {names_file}: {bad[0]!r} is not a task name (no ',' or '=')")
    return f"{','.join(names)}={adapter[0]}"


@app.command("remove")
@handle_errors
def remove_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    name: Annotated[str, typer.Argument(help="Task to remove.")],
) -> None:
    """Remove a task (its shared prompt goes too when no other task uses it)."""
    b = remove_task(bundle, name)
    console.print(f"[green]removed[/] {escape(name)}; the bundle has {len(b.tasks)} task(s)")

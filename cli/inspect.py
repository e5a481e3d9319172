from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import console, escape, handle_errors
from mpt_export.source.adapters import read_adapter


@handle_errors
def inspect_cmd(
    adapters: Annotated[list[Path], typer.Argument(metavar="ADAPTER_DIR", help="PEFT MPT adapter directories (adapter_config.json + weights).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")] = False,
) -> None:
    """Show what is in PEFT Multitask Prompt Tuning checkpoints: kind, tasks, shapes, bytes per task."""
    summaries = [read_adapter(a).summary() for a in adapters]
    if as_json:
        console.print_json(json.dumps(summaries))
        return
    for s in summaries:
        t = Table(title=escape(s["path"]), title_justify="left", show_header=False)
        t.add_column("field")
        t.add_column("value")
        for k, v in s.items():
            if k != "path":
                t.add_row(k, escape(str(v)))
        console.print(t)

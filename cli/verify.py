from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import Quiet, console, escape, handle_errors, parity_table, progress, quiet_libraries
from mpt_export.export.api import verify_bundle
from mpt_export.bundle.taskbank import name_list


@handle_errors
def verify_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    base_model: Annotated[str | None, typer.Option("--base-model", metavar="DIR|HUB_ID", help="Also check parity against PEFT over this base model: a directory or a Hugging Face Hub id (org/name[@REVISION]; needs the export extra).")] = None,
    atol: Annotated[float | None, typer.Option(help="Parity: absolute part of the tolerance.", show_default="the bundle's own, from its export")] = None,
    rtol: Annotated[float | None, typer.Option(help="Parity: part of the tolerance relative to each output's magnitude.", show_default="the bundle's own")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed for the parity inputs.", show_default="random")] = None,
    quiet: Quiet = False,
) -> None:
    """Check every file's sha256 against the manifest and the task bank against its task list (as every reader does),
    refusing links; with --base-model, re-run parity against PEFT."""
    if base_model is not None:
        quiet_libraries()
        with progress("verify", quiet) as on_step:
            r = verify_bundle(bundle, base_model=base_model, atol=atol, rtol=rtol, seed=seed, on_step=on_step)
        if r.get("note"):
            console.print(escape(r["note"]))
        else:
            console.print(parity_table(r["validation"]))
    else:
        r = verify_bundle(bundle)
    console.print(f"[green]ok[/] {escape(r['path'])}: {r['files']} files match their sha256; tasks: "
                  f"{escape(name_list(r['tasks']))}")

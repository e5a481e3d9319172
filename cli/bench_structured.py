from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from ._common import Quiet, console, escape, handle_errors, progress, quiet_libraries
from mpt_export.tools.presets import check_preset


@handle_errors
def bench_structured_cmd(
    bundle: Annotated[Path | None, typer.Argument(help="Bundle to measure.", show_default="the --preset's, built under --workdir")] = None,
    preset: Annotated[str, typer.Option(help="Without BUNDLE: the bench preset whose bundle to use (see `mpt-export bench --help`).")] = "llama-small",
    workdir: Annotated[Path, typer.Option(help="Where the preset's bundle is built (shared with `mpt-export bench`).")] = Path("build/bench"),
    batch: Annotated[int, typer.Option(help="Rows decoded together.")] = 8,
    new_tokens: Annotated[int, typer.Option(help="New tokens per row.")] = 32,
    rounds: Annotated[int, typer.Option(help="Measured rounds (after one warm-up), free and constrained interleaved.")] = 3,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads.", show_default="one per core")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw figures as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """What a structured-output constraint (a JSON schema on every row) costs a decode step: llguidance's mask and its
    application, against the step."""
    from mpt_export.tools.bench import prepare_preset
    from mpt_export.tools.bench_structured import run_bench_structured

    if bundle is None:
        check_preset(preset)
    quiet_libraries()
    with progress("bench-structured", quiet) as on_step:
        if bundle is None:
            _, bundle, _ = prepare_preset(preset, workdir, on_step)
        r = run_bench_structured(bundle, batch=batch, new_tokens=new_tokens, rounds=rounds, threads=threads,
                                 on_step=on_step)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    t = Table(title=escape(f"bench-structured {r['bundle']}: batch {r['batch']}, {r['new_tokens']} new tokens, "
                           f"sampled; min / median of {r['rounds']} rounds"), title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("rows", "decode step", "mask", "of which llguidance", "numpy apply", "complete"):
        t.add_column(col, justify="left" if col == "rows" else "right", no_wrap=True)

    def mm(x):
        return f"{x['min']:.2f} / {x['median']:.2f} ms"

    for name, label in (("free", "no constraint"), ("json", "JSON schema, every row")):
        row = r[name]
        t.add_row(label, mm(row["step_ms"]), mm(row["mask_ms"]) if name == "json" else "-",
                  mm(row["llguidance_ms"]) if name == "json" else "-", mm(row["apply_ms"]) if name == "json" else "-",
                  f"{row['complete']}/{r['batch']}" if name == "json" else "-")
    t.caption = (f"mask = {r['mask_share_of_step']:.1%} of an unconstrained decode step at batch {r['batch']} "
                 f"(llguidance {r['llguidance_share_of_step']:.1%}); the schema compiled once in "
                 f"{r['compile_ms']:.1f} ms; complete: rows whose JSON ended within the budget")
    console.print(t)

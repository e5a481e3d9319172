"""The ``mpt-export`` command line (installed as ``mpt_export.cli``). One command per module; each body calls one
library function. Library errors become one red line and exit code 1; heavy modules load only inside commands."""

from __future__ import annotations

from typing import Annotated

import typer

from ._help import conventional_help, unwrap_docstrings
from . import (bench, bench_export, bench_serve, bench_structured, build, demo, evaluate, export, generate, inspect,
               quantize, serve, tasks, triton, verify)
from mpt_export.version import __version__

conventional_help()
app = typer.Typer(
    name="mpt-export",
    help="Ship Multitask Prompt Tuning (PEFT) models: export to a validated ONNX bundle, generate with any task from one backbone, add tasks at runtime, benchmark.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)
app.command(name="inspect")(inspect.inspect_cmd)
app.command(name="export")(export.export_cmd)
app.command(name="verify")(verify.verify_cmd)
app.command(name="quantize")(quantize.quantize_cmd)
app.command(name="generate")(generate.generate_cmd)
app.command(name="eval")(evaluate.eval_cmd)
app.add_typer(tasks.app, name="tasks")
app.command(name="build")(build.build_cmd)
app.command(name="check-trt")(build.check_trt_cmd)
app.command(name="serve")(serve.serve_cmd)
app.command(name="triton")(triton.triton_cmd)
app.command(name="bench")(bench.bench_cmd)
app.command(name="bench-serve")(bench_serve.bench_serve_cmd)
app.command(name="bench-export")(bench_export.bench_export_cmd)
app.command(name="bench-structured")(bench_structured.bench_structured_cmd)
app.command(name="demo")(demo.demo_cmd)
unwrap_docstrings(app)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"mpt-export {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


def main() -> None:
    app()


if __name__ == "__main__":
    main()

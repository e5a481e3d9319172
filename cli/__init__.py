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
    help="Ship Multitask Prompt Tuning (PEFT) models: export to a validated ONNX bundle, generate with any task from one "
         "backbone, add tasks at runtime, serve every task from one OpenAI-compatible server, benchmark.\n\n"
         "Start with `mpt-export demo`; then `mpt-export export --base-model DIR --adapter NAMES=DIR --out BUNDLE`, "
         "`mpt-export generate BUNDLE --task NAME TEXT`, `mpt-export serve BUNDLE`.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)
# listed by workflow, in the order a user meets them
START, MAKE, RUN, DEPLOY, MEASURE = ("Start here", "Export and check a bundle", "Generate and manage tasks",
                                     "Serve and deploy", "Measure")
app.command(name="demo", rich_help_panel=START)(demo.demo_cmd)
app.command(name="inspect", rich_help_panel=MAKE)(inspect.inspect_cmd)
app.command(name="export", rich_help_panel=MAKE)(export.export_cmd)
app.command(name="verify", rich_help_panel=MAKE)(verify.verify_cmd)
app.command(name="quantize", rich_help_panel=MAKE)(quantize.quantize_cmd)
app.command(name="generate", rich_help_panel=RUN)(generate.generate_cmd)
app.command(name="eval", rich_help_panel=RUN)(evaluate.eval_cmd)
app.add_typer(tasks.app, name="tasks", rich_help_panel=RUN)
app.command(name="serve", rich_help_panel=DEPLOY)(serve.serve_cmd)
app.command(name="triton", rich_help_panel=DEPLOY)(triton.triton_cmd)
app.command(name="build", rich_help_panel=DEPLOY)(build.build_cmd)
app.command(name="check-trt", rich_help_panel=DEPLOY)(build.check_trt_cmd)
app.command(name="bench", rich_help_panel=MEASURE)(bench.bench_cmd)
app.command(name="bench-serve", rich_help_panel=MEASURE)(bench_serve.bench_serve_cmd)
app.command(name="bench-export", rich_help_panel=MEASURE)(bench_export.bench_export_cmd)
app.command(name="bench-structured", rich_help_panel=MEASURE)(bench_structured.bench_structured_cmd)
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

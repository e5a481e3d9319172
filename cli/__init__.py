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
# listed by workflow, in the order a user meets them: (panel, [(name, command)])
WORKFLOW = [
    ("Start here", [("demo", demo.demo_cmd)]),
    ("Export and check a bundle", [("inspect", inspect.inspect_cmd), ("export", export.export_cmd),
                                   ("verify", verify.verify_cmd), ("quantize", quantize.quantize_cmd)]),
    ("Generate and manage tasks", [("generate", generate.generate_cmd), ("eval", evaluate.eval_cmd),
                                   ("tasks", tasks.app)]),
    ("Serve and deploy", [("serve", serve.serve_cmd), ("triton", triton.triton_cmd), ("build", build.build_cmd),
                          ("check-trt", build.check_trt_cmd)]),
    ("Measure", [("bench", bench.bench_cmd), ("bench-serve", bench_serve.bench_serve_cmd),
                 ("bench-export", bench_export.bench_export_cmd),
                 ("bench-structured", bench_structured.bench_structured_cmd)]),
]
for panel, commands in WORKFLOW:
    for name, command in commands:
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=name, rich_help_panel=panel)
        else:
            app.command(name=name, rich_help_panel=panel)(command)
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

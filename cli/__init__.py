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
# a few lines a user can copy, at the end of a command's --help (paths as the demo writes them)
EXAMPLES = {
    "demo": ["mpt-export demo --workdir build/demo"],
    "inspect": ["mpt-export inspect build/demo/adapters/source build/demo/adapters/target"],
    "export": ["mpt-export export my-bundle --base-model build/demo/base --adapter sst2,mnli,qnli=build/demo/adapters/"
               "source --adapter rte=build/demo/adapters/target",
               "mpt-export export my-bundle --base-model meta-llama/Llama-3.2-1B --adapter a,b=ADAPTER_DIR --dtype fp16"],
    "verify": ["mpt-export verify build/demo/bundle --base-model build/demo/base"],
    "quantize": ["mpt-export quantize build/demo/bundle --out build/demo-int4 --quantize int4"],
    "generate": ["mpt-export generate build/demo/bundle --task sst2 \"the movie was\"",
                 "mpt-export generate build/demo/bundle --task qnli \"the station is\" --max-new-tokens 8 --json",
                 "mpt-export generate build/demo/bundle --task sst2 \"the movie was\" --choice positive --choice negative"],
    "eval": ["mpt-export eval build/demo/bundle --data my-data.jsonl"],
    "serve": ["mpt-export serve build/demo/bundle --port 8000",
              "mpt-export serve build/demo/bundle --port 8000 --api-key KEY --task-alias sentiment=sst2"],
    "triton": ["mpt-export triton build/demo/bundle --out model-repo"],
    "build": ["mpt-export build build/demo/bundle --print-trtexec", "mpt-export build build/demo/bundle --max-batch 8"],
    "check-trt": ["mpt-export check-trt build/demo/bundle"],
    "bench": ["mpt-export bench", "mpt-export bench --peer onnxruntime-genai --preset llama-small"],
    "bench-serve": ["mpt-export bench-serve --clients 16", "mpt-export bench-serve --preset tiny --tasks 1000"],
    "bench-export": ["mpt-export bench-export --shape tinyllama-1.1b"],
    "bench-structured": ["mpt-export bench-structured build/demo/bundle"],
}


def _epilog(name: str) -> str | None:
    lines = EXAMPLES.get(name)
    return "Examples:\n\n" + "\n\n".join(lines) if lines else None


for panel, commands in WORKFLOW:
    for name, command in commands:
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=name, rich_help_panel=panel)
        else:
            app.command(name=name, rich_help_panel=panel, epilog=_epilog(name))(command)
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

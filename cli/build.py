from __future__ import annotations

import importlib.metadata as md
import json
from pathlib import Path
from typing import Annotated

import typer

from ._common import Quiet, console, escape, handle_errors, progress
from mpt_export.bundle.reader import load_bundle
from mpt_export.errors import InputError
from mpt_export.export.trt_build import adopt_engines, build_engines
from mpt_export.runtime.trt.check import check_trt
from mpt_export.runtime.trt.commands import format_commands, resolve_precision, trtexec_commands
from mpt_export.runtime.trt.profiles import describe_limits, fit_limits, profiles
from mpt_export.runtime.trt.versions import check_target, opset_problem, parse_trt_version


def _limits(bundle, max_batch, max_input, max_new_tokens):
    """The limits to use (typed ones kept, defaults fitted to the model) and the line that says which they are."""
    typed = {"max_batch": max_batch, "max_input": max_input, "max_new_tokens": max_new_tokens}
    limits = fit_limits(bundle.info, **typed)
    return limits, describe_limits(limits, typed)


@handle_errors
def build_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    out: Annotated[Path | None, typer.Option("--out", help="Engines folder.", show_default="engines/<bundle name>")] = None,
    max_batch: Annotated[int | None, typer.Option(help="Largest batch the engines accept.", show_default="8")] = None,
    max_input: Annotated[int | None, typer.Option(help="Longest input (tokens) the engines accept.", show_default="512, less where the model's positions are fewer")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Most new tokens per request.", show_default="128, at most a quarter of the positions left after the prompt")] = None,
    precision: Annotated[str, typer.Option(help="auto (the bundle's), fp32, fp16, bf16. TensorRT 11 needs a bundle of that dtype.")] = "auto",
    timing_cache: Annotated[Path | None, typer.Option(help="Timing cache file, read and written (faster rebuilds).")] = None,
    version_compatible: Annotated[bool, typer.Option("--version-compatible", help="Engines later TensorRT releases can load: later releases of the same major, and across majors the pairs NVIDIA documents (built with 10, run by 11). Slower than engines for one release; Triton loads them only with --backend-config=tensorrt,version-compatible=true.")] = False,
    workspace_mib: Annotated[int | None, typer.Option(help="Builder workspace limit in MiB.")] = None,
    trt_version: Annotated[str | None, typer.Option(help="With --print-trtexec: the TensorRT release of the target board, MAJOR[.MINOR] (JetPack 6.1/6.2: 10.3; 10 means 10.0, the strictest 10.x; default 10). With --adopt where the tensorrt package is missing: the release whose trtexec built the plans.")] = None,
    tf32: Annotated[bool, typer.Option("--tf32", help="Let fp32 layers use TF32 tensor cores (TensorRT's default; off here so fp32 means fp32).")] = False,
    print_trtexec: Annotated[bool, typer.Option("--print-trtexec", help="Print the equivalent trtexec commands (for boards without the Python bindings) and exit.")] = False,
    adopt: Annotated[bool, typer.Option("--adopt", help="After the printed trtexec commands ran: check their plans in --out against the bundle and write engine.json, so generate/triton --backend tensorrt take them. Give the options the commands were printed with.")] = False,
    quiet: Quiet = False,
) -> None:
    """Build TensorRT engines for a bundle (prefill and decode profiles), or print the trtexec commands."""
    b = load_bundle(bundle)
    limits, said = _limits(b, max_batch, max_input, max_new_tokens)
    if adopt:
        path = adopt_engines(bundle, out, limits, precision, version_compatible, tf32, trt_version)
        side = json.loads((path / "engine.json").read_text())
        console.print(f"[green]adopted[/] {escape(str(path))}: plans built by trtexec (TensorRT "
                      f"{side['tensorrt_version']}), precision {side['precision']['precision']}; "
                      + ("checked against the bundle" if side["gpu_name"] else "TensorRT checks them when they load"))
        return
    if print_trtexec:
        target = parse_trt_version(trt_version or "10")
        check_target(target)
        said_opset = opset_problem(b.info.opset, target)
        if said_opset:
            raise InputError(said_opset)
        prec = resolve_precision(precision, target[0], b.info.dtype, tf32)
        engines = out or Path("engines") / b.path.name
        profs = profiles(b.info, limits)
        cmds = trtexec_commands(b, profs, engines, prec, str(timing_cache) if timing_cache else None, workspace_mib,
                                version_compatible)
        print(f"# TensorRT {target[0]}.{target[1]}, precision {prec['precision']}; profiles in order: "
              + "; ".join(f"{g}: {', '.join(p['name'] for p in ps)}" for g, ps in profs.items()))
        print(f"# {said}")
        print(f"mkdir -p {engines}")
        print(format_commands(cmds))
        flags = [f"--out {engines}", f"--max-batch {limits.max_batch}", f"--max-input {limits.max_input}",
                 f"--max-new-tokens {limits.max_new_tokens}", f"--precision {precision}",
                 f"--trt-version {target[0]}.{target[1]}"] + ["--version-compatible"] * version_compatible + \
            ["--tf32"] * tf32
        print("# then, so that generate/triton --backend tensorrt take the plans (on the board; --trt-version: "
              f"the release whose trtexec built them):\nmpt-export build {bundle} --adopt {' '.join(flags)}")
        return

    console.print(escape(said))
    with progress("build", quiet) as on_step:
        path = build_engines(bundle, out, limits, precision, timing_cache, version_compatible, workspace_mib, on_step,
                             tf32=tf32)
    side = json.loads((path / "engine.json").read_text())
    console.print(f"[green]engines[/] {escape(str(path))}: TensorRT {side['tensorrt_version']}, {side['gpu_name']} "
                  f"(sm {side['compute_capability']}), precision {side['precision']['precision']}")


@handle_errors
def check_trt_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    max_batch: Annotated[int | None, typer.Option(help="Profile limit: batch.", show_default="8")] = None,
    max_input: Annotated[int | None, typer.Option(help="Profile limit: input tokens.", show_default="512, fitted to the model")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="Profile limit: new tokens.", show_default="128, fitted to the model")] = None,
    trt_version: Annotated[str | None, typer.Option(help="The TensorRT release the engines are for, MAJOR[.MINOR] (its parser's opset range is checked).", show_default="the installed tensorrt, else 10.0")] = None,
) -> None:
    """CPU-only: will TensorRT's ONNX parser accept these graphs (ops, dtypes, external data, profile bounds)?"""
    target = parse_trt_version(trt_version or _installed_trt() or "10.0")
    check_target(target)
    b = load_bundle(bundle)
    limits, said = _limits(b, max_batch, max_input, max_new_tokens)
    console.print(escape(said) + f"; for TensorRT {target[0]}.{target[1]}")
    summary = check_trt(b, limits, target)
    for g, s in summary.items():
        console.print(f"[green]ok[/] {g}: {escape(s['file'])}, {s['nodes']} nodes / {s['ops']} op types, all supported; "
                      f"profiles {', '.join(s['profiles'])}; external data {', '.join(s['external_data']) or '-'}")
        for w in s.get("warnings", []):
            console.print(f"[yellow]warning[/] {escape(w)}")
    if b.info.fused:
        console.print(f"not for TensorRT: {escape(b.info.fused.file)} (the fused backbone graph: ONNX Runtime's own "
                      "operators; the engines are built from the traced graph above)")


def _installed_trt() -> str | None:
    """The installed tensorrt's version, read from its package metadata (nothing imported)."""
    for dist in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_lean"):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            continue
    return None

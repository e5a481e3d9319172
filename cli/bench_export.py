from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from ._common import Quiet, console, escape, handle_errors, progress, quiet_libraries
from mpt_export.tools.bench_export import check_shape, run_bench_export


def _gib(b) -> str:
    return f"{b / 2**30:.2f} GiB" if b else "-"


@handle_errors
def bench_export_cmd(
    shape: Annotated[str, typer.Option(help="Real model shape (random weights): tinyllama-1.1b, llama-3b, t5-xl, llama-7b, qwen3-0.6b, qwen3-1.7b, gemma-3-1b, phi-4-mini or smollm3-3b.")] = "tinyllama-1.1b",
    dtype: Annotated[str | None, typer.Option(metavar="fp32|fp16|bf16", help="Export dtype.", show_default="fp32; fp16 for llama-7b, phi-4-mini and smollm3-3b")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the model, adapter and bundle are built.")] = Path("build/bench-export"),
    keep: Annotated[bool, typer.Option("--keep", help="Keep the shape's files (tens of GB) for a later run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw figures as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Export a real model size on this machine: peak memory vs weight bytes, time per phase, parity, start-up and
    generation."""
    check_shape(shape, dtype)  # a mistyped shape or dtype answers at once, not after torch loads
    quiet_libraries()

    with progress("bench-export", quiet) as on_step:
        r = run_bench_export(shape, dtype=dtype, workdir=workdir, keep=keep, on_step=on_step)
    if as_json:
        print(json.dumps(r, indent=2))
        return
    ex = r["export"]
    t = Table(title=escape(f"bench-export {r['shape']} ({r['params'] / 1e9:.2f} B params, {r['dtype']}, random "
                           "weights, 2 tasks x 100 virtual tokens)"), title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("figure", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    tm = ex["timings"]
    rows = [("weights", _gib(r["weight_bytes"])),
            ("export peak RSS (whole process)", f"{_gib(ex['peak_rss'])}  ({ex['ratio']:.2f}x weights)"),
            ("  torch phase peak (load, export, reference)", f"{tm.get('torch_phase_peak_rss_mib', 0) / 1024:.2f} GiB"),
            ("  validation peak (ONNX Runtime)", f"{tm.get('validate_peak_rss_mib', 0) / 1024:.2f} GiB"
             if "validate_peak_rss_mib" in tm else "-"),
            ("export wall time", f"{ex['wall_s']:.0f} s"),
            ("  load / graph export+write / reference / validate",
             " / ".join(f"{tm.get(k, 0):.0f} s" for k in ("load_s", "graph_export_s", "reference_s", "validate_s"))),
            ("bundle", _gib(ex["bundle_bytes"]))]
    v = ex.get("validation")
    if v:
        worst = max(v["logits_max_rel"], v["kv_max_rel"])
        rows.append(("parity (max rel: logits / KV)", f"{v['logits_max_rel']:.2e} / {v['kv_max_rel']:.2e}  "
                     f"({'passed' if v['passed'] else 'FAILED'}, worst = {worst / v['rtol']:.2f}x rtol {v['rtol']:g})"))
    else:
        rows.append(("parity", "not checked at full size here (see the next rows)"))
    sh = r.get("shallow")
    if sh:
        sv = sh["validation"]
        role = "validation stand-in" if sh.get("stands_in_for_validation") else "for the planted error"
        rows += [(f"{sh['layers']}-layer copy ({role})", f"{_gib(sh['weight_bytes'])} weights, peak "
                  f"{_gib(sh['peak_rss'])} ({sh['ratio']:.2f}x), {'passed' if sv['passed'] else 'FAILED'}"),
                 ("  its parity (max rel: logits / KV)", f"{sv['logits_max_rel']:.2e} / {sv['kv_max_rel']:.2e}")]
    pl = r.get("planted")
    if pl:
        if "caught" not in pl:
            rows.append(("planted error", escape(pl.get("error", "-"))))
        elif pl["caught"]:
            rows.append((f"  planted error (mid-depth v x{pl['factor']})", f"caught: worst rel {pl['worst_rel']:.2e} "
                         f"= {pl['worst_rel'] / pl['rtol']:.0f}x rtol {pl['rtol']:g}"))
        else:
            rows.append((f"  planted error (mid-depth v x{pl['factor']})", "[red]NOT caught[/]"))
    st = r.get("startup")
    if st:
        for k, label in (("cold", "cold"), ("warm", "warm"), ("warm_prepacked", "warm, --prepack")):
            x = st.get(k)
            if x and "open_s" in x:
                how = "prepacked" if x.get("prepacked") else "weights in place"
                rows.append((f"open + session ({label})", f"{x['open_s']:.1f} s + {x['session_s']:.1f} s ({how}), "
                             f"peak {_gib(x['peak_rss'])}"))
            elif k == "cold":
                rows.append(("open + session (cold)", "- (dropping the page cache needs root)"))
    for key, label in (("generate", "generate 8 x 64 -> 8 new"), ("generate_prepacked", "  the same, --prepack")):
        g = r.get(key, {})
        if "tokens_per_s" in g:
            rows.append((label, f"{g['tokens_per_s']:.1f} tok/s, peak {_gib(g['peak_rss'])} "
                         f"({g['peak_rss'] / r['weight_bytes']:.2f}x weights: weights + KV and activations)"))
        elif key == "generate":
            rows.append(("generate", escape(g.get("skipped") or g.get("error", "-"))))
    for a, b in rows:
        t.add_row(escape(a), b)
    console.print(t)

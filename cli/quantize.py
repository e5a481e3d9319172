from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import console, handle_errors, progress, quant_line, quiet_libraries, size_table


@handle_errors
def quantize_cmd(
    bundle: Annotated[Path, typer.Argument(help="An fp32 bundle (left untouched).")],
    out: Annotated[Path, typer.Option("--out", help="The int8 bundle to write.")],
    min_agreement: Annotated[float, typer.Option(help="Refuse if greedy-token agreement with fp32 is below this.")] = 0.9,
    seed: Annotated[int, typer.Option(help="Seed for the comparison inputs.")] = 0,
    variant: Annotated[str, typer.Option(help="What is int8: matmul (default: every MatMul/Gemm, the embedding table stays float), all (the embedding table too), matmul-fp32-head, matmul-fp32-head-ends (the LM head / also the first and last layer stay float).")] = "matmul",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is a bundle mpt-export wrote (never the source bundle).")] = False,
) -> None:
    """int8 (ONNX Runtime dynamic, per-channel) copy of a bundle for CPUs, checked against the fp32 bundle."""
    from mpt_export.storage.ownership import check_replaceable

    check_replaceable(out, "bundle", force, [("source bundle", bundle)])  # refuse before loading torch
    quiet_libraries()
    from mpt_export.export.quantize import quantize_bundle

    with progress("quantize") as on_step:
        b = quantize_bundle(bundle, out, min_agreement=min_agreement, force=force, seed=seed, on_step=on_step,
                            variant=variant)
    console.print(quant_line(b.manifest["quantization"]["report"]))
    console.print(size_table(b))

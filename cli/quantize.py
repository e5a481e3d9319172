from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import Quiet, console, handle_errors, progress, quant_line, quiet_libraries, size_table
from mpt_export.export.quantize import quantize_bundle, QuantizeOptions
from mpt_export.storage.ownership import check_replaceable
from mpt_export.tools.evaluate import read_data


@handle_errors
def quantize_cmd(
    bundle: Annotated[Path, typer.Argument(help="An fp32 bundle (left untouched).")],
    out: Annotated[Path, typer.Option("--out", help="The quantized bundle to write.")],
    quantize: Annotated[str, typer.Option("--quantize", metavar="int8|int4|int8-dynamic", help="int8 or int4: weight-only (MatMul weights in symmetric blocks, ONNX Runtime's MatMulNBits); int8-dynamic: ONNX Runtime dynamic quantization (activations quantized at every step).")] = "int8",
    block_size: Annotated[int | None, typer.Option(help="int8/int4: weight rows per scale, a power of two >= 16.", show_default="32")] = None,
    accuracy_level: Annotated[int | None, typer.Option(help="int8/int4: MatMulNBits' accuracy_level: 4 quantizes each activation row to int8 inside the op (ONNX Runtime GenAI's CPU setting; fast integer kernels), 0 keeps activations float (exact, but int8 is then ~30x slower on x86 CPUs).", show_default="4")] = None,
    embeddings: Annotated[str | None, typer.Option(metavar="quantized|float", help="int8/int4: the embedding table in int8 blocks of --block-size (ONNX Runtime's GatherBlockQuantized; a 32k x 768 table: 94 MiB in float, 24 MiB quantized: a smaller bundle, not a faster one) or float. Its effect is in the agreement reported.", show_default="quantized")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Refuse if greedy-token agreement with fp32 is below this.", show_default="0.95 int8, 0.85 int4, 0.9 int8-dynamic")] = None,
    seed: Annotated[int, typer.Option(help="Seed for the comparison inputs.")] = 0,
    variant: Annotated[str | None, typer.Option(help="int8-dynamic: what is int8: matmul (every MatMul/Gemm, the embedding table stays float), all (the embedding table too), matmul-fp32-head, matmul-fp32-head-ends (the LM head / also the first and last layer stay float).", show_default="matmul")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is a bundle mpt-export wrote (never the source bundle).")] = False,
    eval_data: Annotated[Path | None, typer.Option("--eval-data", help="Judge the agreement with fp32 on these prompts (the JSONL of `mpt-export eval`, every line naming its task) instead of random token ids.")] = None,
    quiet: Quiet = False,
) -> None:
    """Quantized copy of an fp32 bundle for ONNX Runtime (weight-only int8/int4, or dynamic int8), checked against
    the fp32 bundle."""
    options = QuantizeOptions(scheme=quantize, block_size=block_size, accuracy_level=accuracy_level,
                              variant=variant, min_agreement=min_agreement, embeddings=embeddings)
    import mpt_export

    mpt_export.load_bundle(bundle, verify=False).close()  # a wrong path answers now, not after torch loads
    check_replaceable(out, "bundle", force, [("source bundle", bundle)])  # refuse before loading torch
    quiet_libraries()

    prompts = None
    if eval_data is not None:
        with mpt_export.load_bundle(bundle) as src:
            tok = src.session().tokenizer
            prompts = [(tok.encode(e.prompt, e.where), e.task) for e in read_data(eval_data, None, src.tasks)]
    with progress("quantize", quiet) as on_step:
        b = quantize_bundle(bundle, out, options, force=force, seed=seed, on_step=on_step, eval_prompts=prompts)
    console.print(quant_line(b.info.quantization))
    console.print(size_table(b))

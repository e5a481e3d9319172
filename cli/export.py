from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._common import Quiet, console, escape, handle_errors, parity_table, progress, quant_line, quiet_libraries, size_table
from mpt_export.export.api import check_export_inputs, export_bundle
from mpt_export.export.options import ExportOptions
from mpt_export.bundle.taskbank import name_list
from mpt_export.errors import InputError


@handle_errors
def export_cmd(
    base_model: Annotated[str, typer.Option("--base-model", metavar="DIR|HUB_ID", help="The model the adapters were trained on: a save_pretrained directory or a Hugging Face Hub id (Qwen/Qwen3-0.6B; read into the Hub cache, HF_HUB_OFFLINE respected). A causal LM of a listed family (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-2/3/4, SmolLM3, Granite, OLMo 2, GPT-NeoX, OPT, Falcon, BLOOM, StarCoder2, GPT-2; others are tried and kept only if validation passes) or a T5-family encoder-decoder.")],
    adapter: Annotated[list[str], typer.Option("--adapter", metavar="[NAMES=]DIR", help="A PEFT MPT adapter: a directory or a Hub id (org/name, org/name@REVISION); NAMES is one comma-separated name per task, in order (without NAMES: the directory name, with -<i> for several tasks). Repeatable.")],
    bundle: Annotated[Path | None, typer.Argument(help="Bundle directory to create (written atomically); or --out.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option("--out", help="The bundle directory to create, as BUNDLE (either form).")] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset to request (the dynamo exporter needs >= 18); the opset written is recorded in the manifest.")] = 18,
    atol: Annotated[float | None, typer.Option(help="Validation: an output passes when max|bundle - PEFT| <= atol + rtol x max|PEFT|.", show_default="per dtype, shown in the report")] = None,
    rtol: Annotated[float | None, typer.Option(help="Validation: the part of the tolerance relative to each output's magnitude (see --atol).", show_default="per dtype: 1e-4 fp32, 3e-2 fp16, 6e-2 bf16")] = None,
    dtype: Annotated[str, typer.Option(metavar="fp32|fp16|bf16", help="Backbone precision: fp32, fp16 or bf16 (norms and softmax kept in fp32; TensorRT 11 needs the precision in the graph).")] = "fp32",
    quantize: Annotated[str | None, typer.Option(metavar="int8|int4|int8-dynamic", help="int8 or int4: write a weight-only quantized bundle for ONNX Runtime (MatMulNBits); int8-dynamic: ONNX Runtime dynamic quantization. Checked against the fp32 export.")] = None,
    block_size: Annotated[int | None, typer.Option(help="With --quantize int8/int4: weight rows per scale.", show_default="32")] = None,
    accuracy_level: Annotated[int | None, typer.Option(help="With --quantize int8/int4: MatMulNBits' accuracy_level (4: int8 activations inside the op; 0: float activations).", show_default="4")] = None,
    min_agreement: Annotated[float | None, typer.Option(help="With --quantize: refuse the bundle if its greedy-token agreement with fp32 is below this.", show_default="0.95 int8, 0.85 int4, 0.9 int8-dynamic")] = None,
    provider: Annotated[str, typer.Option(metavar="cpu|cuda|tensorrt|dml|coreml|NAME", help="ONNX Runtime provider for validation: cpu, cuda, tensorrt, dml, coreml or an ONNX Runtime provider name (bf16 needs a GPU provider).")] = "cpu",
    validate: Annotated[bool, typer.Option("--validate/--no-validate", help="Compare the bundle with PEFT on fresh random inputs after export.")] = True,
    fast_graph: Annotated[bool, typer.Option("--fast-graph/--no-fast-graph", help="Also write the fused ONNX Runtime graph (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-2/3/4, Granite, OLMo 2, SmolLM3 with head sizes a multiple of 16; fp32 bundles and their int8/int4 copies): faster decoding on the CPU, its weights stored once with the traced graph's.")] = True,
    seed: Annotated[int | None, typer.Option(help="Seed for the validation inputs.", show_default="random, recorded in the manifest")] = None,
    revision: Annotated[str | None, typer.Option(help="With a Hub id for --base-model: the branch, tag or commit to read.", show_default="main")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is a bundle mpt-export wrote (never any other directory, never an input).")] = False,
    quiet: Quiet = False,
) -> None:
    """Export MPT adapters over one frozen base model (causal LM or T5) into a validated ONNX bundle."""
    if bundle is None and out is None:
        raise InputError("name the bundle to create: mpt-export export BUNDLE ... (or --out BUNDLE)")
    if bundle is not None and out is not None and bundle != out:
        raise InputError(f"BUNDLE {bundle} and --out {out} name two outputs; give one")
    out = bundle or out
    options = ExportOptions(opset=opset, dtype=dtype, atol=atol, rtol=rtol, validate=validate, quantize=quantize,
                            min_agreement=min_agreement, block_size=block_size, accuracy_level=accuracy_level, force=force, seed=seed, provider=provider,
                            fast_graph=fast_graph, revision=revision)
    check_export_inputs(base_model, adapter, out, options)  # paths, configs, adapters: answered before torch loads
    quiet_libraries()

    with progress("export", quiet) as on_step:
        b = export_bundle(base_model, adapter, out, options, on_step=on_step)
    console.print(parity_table(b.info.validation))
    bm = b.base_model
    if bm.get("features"):
        console.print(f"base model: {escape(str(bm.get('model_type')))} with {escape(', '.join(bm['features']))}")
    if bm.get("listed_family") is False:
        console.print(f"[yellow]note:[/] model type {escape(str(bm.get('model_type')))} is not a listed family: "
                      "it was exported through the generic path and kept because validation against PEFT passed")
    if b.info.quantization:
        console.print(quant_line(b.info.quantization))
    console.print(size_table(b))
    console.print(f"[green]wrote[/] {escape(str(b.path))} with {len(b.tasks)} task(s): {escape(name_list(b.tasks))}")

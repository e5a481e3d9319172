from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from ._common import console, handle_errors


def _read_jsonl(path: Path, default_task: str | None) -> tuple[list[str], list[str]]:
    from mpt_export.errors import InputError

    texts, tasks = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise InputError(f"cannot read --input-file {path} ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"{path}:{n} is not JSON; expected one {{\"task\": ..., \"text\": ...}} object per line") from None
        if not isinstance(rec, dict) or "text" not in rec:
            raise InputError(f"{path}:{n} has no \"text\"; expected {{\"task\": ..., \"text\": ...}}")
        task = rec.get("task", default_task)
        if task is None:
            raise InputError(f"{path}:{n} has no \"task\" and no --task was given")
        texts.append(rec["text"])
        tasks.append(task)
    return texts, tasks


@handle_errors
def generate_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    prompts: Annotated[list[str] | None, typer.Argument(help="Prompt text(s); or use --input-file.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Task for every prompt (JSONL lines may name their own).")] = None,
    input_file: Annotated[Path | None, typer.Option("--input-file", help='JSONL file, one {"task": ..., "text": ...} per line.')] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per batch for --input-file (tasks may mix in a batch).")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per row at most.")] = 32,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = 0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: same seed, same output.")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop a row when its text contains this string (repeatable).")] = None,
    provider: Annotated[str, typer.Option(help="ONNX Runtime provider: cpu, cuda, tensorrt or a provider name.")] = "cpu",
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt (needs --engines).")] = "onnxruntime",
    engines: Annotated[Path | None, typer.Option(help="Engines folder from `mpt-export build` (with --backend tensorrt).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads (default: one per core).")] = None,
    optimization: Annotated[str, typer.Option(help="ONNX Runtime graph optimization level: disable, basic, extended, all.")] = "all",
    prompt_cache: Annotated[bool, typer.Option("--prompt-cache/--no-prompt-cache", help="Start from each task's cached prompt KV.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row: task, text, token ids, timings.")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print tokens as they come (one prompt only).")] = False,
) -> None:
    """Generate text with a bundle: one backbone, any task per row."""
    import mpt_export
    from mpt_export.errors import InputError

    if input_file is not None:
        if prompts:
            raise InputError("give prompts as arguments or --input-file, not both")
        texts, tasks = _read_jsonl(input_file, task)
    else:
        if not prompts:
            raise InputError("no prompt given; pass text arguments or --input-file FILE.jsonl")
        if task is None:
            raise InputError("--task is required with prompt arguments (see `mpt-export tasks list BUNDLE`)")
        texts, tasks = list(prompts), [task] * len(prompts)
    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if stream and len(texts) != 1:
        raise InputError(f"--stream prints one prompt's tokens as they come; got {len(texts)} prompts")
    b = mpt_export.load_bundle(bundle)
    if backend == "tensorrt":
        s = b.session(backend="tensorrt", engines=engines, prompt_kv_cache=prompt_cache)
    else:
        s = b.session(provider=provider, backend=backend, prompt_kv_cache=prompt_cache, intra_op_threads=threads,
                      optimization=optimization)
    tok = s.tokenizer
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
              stop=stop or None)
    for start in range(0, len(texts), batch_size):
        bt, btasks = texts[start:start + batch_size], tasks[start:start + batch_size]
        ids, mask = s.encode_texts(bt)
        on_step = None
        if stream:
            acc, shown = [], [""]

            def on_step(step, rows, toks):
                # decode the whole row each time: a byte-level token may complete a character only later
                acc.append(int(toks[0]))
                text = tok.decode(acc)
                sys.stdout.write(text[len(shown[0]):])
                sys.stdout.flush()
                shown[0] = text
        res = s.generate_detailed(ids, btasks, mask, on_step=on_step, **kw)
        if stream:
            sys.stdout.write("\n")
        for b in range(len(bt)):
            text = s.decode_row(res, b, stop)
            if as_json:
                print(json.dumps({"task": btasks[b], "prompt": bt[b], "text": text,
                                  "ids": res.ids[b, :res.lengths[b]].tolist(), "finish": res.finish[b],
                                  "timings": {k: round(v, 4) for k, v in res.timings.items()}}))
            elif not stream:
                console.print(f"[bold]{btasks[b]}[/] {bt[b]!r} -> {text!r}", highlight=False)

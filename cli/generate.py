from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from mpt_export.runtime.sampling import SamplingParams  # light: no numpy until tokens are chosen

from ._common import Quiet, console, escape, handle_errors, progress, read_text_option
from mpt_export.errors import GenerationError, InputError, MptExportError
from mpt_export.runtime import SessionOptions
from mpt_export.runtime.tokenizer import is_text

MAX_LISTED = 10
# what `generate` does where no option says otherwise — greedy, 32 new tokens, no seed, no stop string: declared
# once, here (the options below take their defaults from it; their help shows them)
CLI_DEFAULTS = SamplingParams(max_new_tokens=32, temperature=0.0)


def read_prompts(path: Path, default_task: str | None) -> list[tuple[int, str, str]]:
    """The whole JSONL file, read and checked before anything runs: -> [(line, task, text)]. Every problem is
    reported as ``file:line`` (the first few together)."""
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise InputError(f"--input-file {path} is a directory; expected a JSONL file") from None
    except OSError as e:
        raise InputError(f"cannot read --input-file {path} ({e.strerror})") from None
    rows, problems = [], []
    for n, bline in enumerate(raw.split(b"\n"), 1):
        try:
            line = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(f"{path}:{n}: not UTF-8 text (byte {e.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{path}:{n}: not JSON ({e.msg}); expected one {{\"task\": ..., \"text\": ...}} object per line")
            continue
        if not isinstance(rec, dict):
            problems.append(f"{path}:{n}: a JSON {type(rec).__name__}, expected an object {{\"task\": ..., \"text\": ...}}")
            continue
        text = rec.get("text")
        task = rec.get("task") if rec.get("task") is not None else default_task  # null: the --task default
        if "text" not in rec:
            problems.append(f"{path}:{n}: no \"text\"")
        elif not isinstance(text, str):
            problems.append(f"{path}:{n}: \"text\" must be a string, got {json.dumps(text)[:40]}")
        elif not text.strip():
            problems.append(f"{path}:{n}: \"text\" is empty")
        elif not is_text(text):
            problems.append(f"{path}:{n}: \"text\" is not valid Unicode (a lone surrogate)")
            text = None
        if task is None:
            problems.append(f"{path}:{n}: no \"task\" and no --task was given")
        elif not isinstance(task, str):
            problems.append(f"{path}:{n}: \"task\" must be a string, got {json.dumps(task)[:40]}")
        if isinstance(text, str) and text.strip() and isinstance(task, str):
            rows.append((n, task, text))
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise InputError("; ".join(problems[:MAX_LISTED]) + more)
    if not rows:
        raise InputError(f"--input-file {path} holds no prompts; expected one {{\"task\": ..., \"text\": ...}} per line")
    return rows


def check_rows(s, rows: list[tuple[int, str, str]], where: str | None, max_new_tokens: int) -> None:
    """Every row's task is known and its tokens fit, before the first one runs."""
    problems = []
    for n, task, text in rows:
        label = f"{where}:{n}: " if where else (f"prompt {n}: " if len(rows) > 1 else "")
        n_tokens = len(s.tokenizer.tok.encode(text).ids)
        if not n_tokens:
            problems.append(f"{label}the text encodes to no tokens")
            continue
        try:
            s.check_request(n_tokens, task, max_new_tokens)
        except MptExportError as e:
            problems.append(f"{label}{e}")
    if problems:
        more = f" (and {len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else ""
        raise InputError("; ".join(problems[:MAX_LISTED]) + more)


@handle_errors
def generate_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    prompts: Annotated[list[str] | None, typer.Argument(metavar="TEXT", help="Prompt text(s); or use --input-file.")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Task for every prompt (JSONL lines may name their own).")] = None,
    input_file: Annotated[Path | None, typer.Option("--input-file", help='JSONL file, one {"task": ..., "text": ...} per line (read and checked whole before anything runs).')] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per batch for --input-file (tasks may mix in a batch).")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per row at most.")] = CLI_DEFAULTS.max_new_tokens,
    temperature: Annotated[float, typer.Option(help="0 = greedy; > 0 samples.")] = CLI_DEFAULTS.temperature,
    top_k: Annotated[int, typer.Option(help="Sample from the k most likely tokens (0 = off).")] = CLI_DEFAULTS.top_k,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")] = CLI_DEFAULTS.top_p,
    seed: Annotated[int | None, typer.Option(help="Sampling seed: same seed, same output.")] = CLI_DEFAULTS.seed,
    stop: Annotated[list[str] | None, typer.Option("--stop", metavar="TEXT", help="Stop a row when its text contains this (non-empty) string (repeatable).")] = None,
    provider: Annotated[str, typer.Option(metavar="cpu|cuda|tensorrt|dml|coreml|NAME", help="ONNX Runtime provider: cpu, cuda, tensorrt (ONNX Runtime's TensorRT execution provider), dml, coreml or an ONNX Runtime provider name.")] = "cpu",
    backend: Annotated[str, typer.Option(help="onnxruntime or tensorrt (needs --engines).")] = "onnxruntime",
    engines: Annotated[Path | None, typer.Option(help="Engines folder from `mpt-export build` (with --backend tensorrt).")] = None,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime intra-op threads.", show_default="one per core")] = None,
    prepack: Annotated[bool | None, typer.Option("--prepack/--no-prepack", help="ONNX Runtime CPU: packed copies of the MatMul weights at start — faster steps, but a second copy of the weights in memory and ~1.5 s of start-up per GB.", show_default="where both copies fit in available memory")] = None,
    optimization: Annotated[str, typer.Option(metavar="disable|basic|extended|all", help="ONNX Runtime graph optimization level: disable, basic, extended, all.")] = "all",
    graph: Annotated[str, typer.Option(metavar="auto|fast|plain", help="Causal bundles on ONNX Runtime: fast (the fused graph), plain (the traced one), or auto: the fused graph where the bundle has one and the provider is the CPU.")] = "auto",
    prompt_cache: Annotated[bool, typer.Option("--prompt-cache/--no-prompt-cache", help="Start from each task's cached prompt KV.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row: task, text, token ids, finish reason, timings (with --stream: JSON lines only).")] = False,
    stream: Annotated[bool, typer.Option("--stream", help="Print text as it is generated (one prompt; with --json any number, as JSON lines).")] = False,
    json_schema: Annotated[Path | None, typer.Option("--json-schema", help="Constrain every row to JSON valid against this JSON schema file (compact: no whitespace unless --whitespace-pattern).", rich_help_panel="Structured output")] = None,
    json_object: Annotated[bool, typer.Option("--json-object", help="Constrain every row to a JSON object.", rich_help_panel="Structured output")] = False,
    choice: Annotated[list[str] | None, typer.Option("--choice", metavar="TEXT", help="Constrain every row to exactly one of these strings (repeatable): a label.", rich_help_panel="Structured output")] = None,
    regex: Annotated[str | None, typer.Option("--regex", help="Constrain every row to text this regular expression matches (whole).", rich_help_panel="Structured output")] = None,
    grammar: Annotated[Path | None, typer.Option("--grammar", help="Constrain every row to this grammar file (Lark, or llama.cpp's GBNF).", rich_help_panel="Structured output")] = None,
    whitespace_pattern: Annotated[str | None, typer.Option(help="With --json-schema/--json-object: the whitespace allowed between JSON tokens (a regular expression).", rich_help_panel="Structured output")] = None,
    quiet: Quiet = False,
) -> None:
    """Generate text with a bundle: one backbone, any task per row."""
    import mpt_export

    rows, where = _rows(prompts, input_file, task)
    if batch_size <= 0:
        raise InputError(f"--batch-size must be positive, got {batch_size}")
    if stream and not as_json and len(rows) != 1:
        raise InputError(f"--stream prints one prompt's text as it comes; got {len(rows)} prompts (add --json to "
                         "stream several as JSON lines)")
    # the settings, checked before the bundle loads: one object from here to the decode loop
    constraint = _constraint(json_schema, json_object, choice, regex, grammar, whitespace_pattern)
    params = SamplingParams.of(CLI_DEFAULTS, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                               top_p=top_p, seed=seed, stop=stop or None, constraint=constraint)
    options = SessionOptions(provider=provider, backend=backend, engines=engines, prompt_kv_cache=prompt_cache,
                             intra_op_threads=threads, optimization=optimization, prepack=prepack, graph=graph)
    with progress("generate", quiet) as on_step:  # a multi-GB bundle: its files hashed, its graphs loaded
        on_step("open the bundle (its files checked against the manifest)")
        b = mpt_export.load_bundle(bundle)
        on_step(f"start the session ({options.backend}, {options.provider})")
        s = b.session(options)
        if constraint is not None:
            from mpt_export.runtime.constraints import grammars_of

            on_step("compile the output constraint")
            grammars_of(s).compile(constraint)  # a bad schema, regex or grammar: one clear error, before any row
    check_rows(s, rows, where, params.max_new_tokens)
    failed = []  # one row never fails another: each row prints its output or its error
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        bt, btasks = [r[2] for r in batch], [r[1] for r in batch]
        ids, mask = s.encode_texts(bt)
        on_text = (lambda r, delta, start=start: _show(delta, start + r, as_json)) if stream else None
        res = s.generate_detailed(ids, btasks, mask, params, on_text=on_text, raise_errors=False)
        for i in range(len(batch)):
            label = f"{where}:{batch[i][0]}" if where else f"prompt {batch[i][0]}"
            if res.errors[i] is not None:
                failed.append(f"{label}: {res.errors[i]}")
            _print_row(s, res, i, params, as_json, stream, where and batch[i][0],
                       {"index": start + i, "task": btasks[i], "prompt": bt[i]})
    if len(rows) == 1 and failed:
        raise GenerationError(failed[0])
    if failed:
        more = f" (and {len(failed) - MAX_LISTED} more)" if len(failed) > MAX_LISTED else ""
        raise GenerationError(f"{len(failed)} of {len(rows)} row(s) failed, the others' output is above: "
                              + "; ".join(failed[:MAX_LISTED]) + more)


def _print_row(s, res, i: int, params, as_json: bool, stream: bool, line: int | None, rec: dict) -> None:
    """One row's output (or its error) as text or a JSON object."""
    error = res.errors[i]
    text = None if error is not None else s.decode_row(res, i, params.stop)
    if stream and not as_json:
        sys.stdout.write("\n")
    if as_json:
        rec.update({"text": text, "ids": res.ids[i, :res.lengths[i]].tolist(), "finish": res.finish[i],
                    "timings": {k: round(v, 4) for k, v in res.timings.items()}})
        if error is not None:
            rec["error"] = {"type": type(error).__name__, "message": str(error)}
        if line:
            rec["line"] = line
        print(json.dumps(rec), flush=True)
    elif not stream:
        shown = f"[bold red]error:[/] {escape(str(error))}" if error is not None else escape(repr(text))
        console.print(f"[bold]{escape(rec['task'])}[/] {escape(repr(rec['prompt']))} -> {shown}", highlight=False)


def _rows(prompts: list[str] | None, input_file: Path | None, task: str | None):
    """(line or argument number, task, text) per prompt, from the arguments or the JSONL file, checked whole; and
    where they came from (the file, or None for arguments)."""
    if input_file is not None:
        if prompts:
            raise InputError("give prompts as arguments or --input-file, not both")
        return read_prompts(input_file, task), str(input_file)
    if not prompts:
        raise InputError("no prompt given; pass text arguments or --input-file FILE.jsonl")
    if task is None:
        raise InputError("--task is required with prompt arguments (see `mpt-export tasks list BUNDLE`)")
    empty = [i for i, p in enumerate(prompts, 1) if not p.strip()]
    if empty:
        raise InputError(f"prompt {empty[0]} is empty; give some text to continue")
    bad = [i for i, p in enumerate(prompts, 1) if not is_text(p)]
    if bad:
        raise InputError(f"prompt {bad[0]} is not valid UTF-8 text; pass UTF-8 text")
    return [(i, task, p) for i, p in enumerate(prompts, 1)], None


def _show(delta: str, index: int, as_json: bool) -> None:
    if not delta:
        return
    if as_json:
        print(json.dumps({"index": index, "delta": delta}), flush=True)
    else:
        sys.stdout.write(delta)
        sys.stdout.flush()


def _constraint(json_schema, json_object, choice, regex, grammar, whitespace_pattern):
    """The one output constraint the options give (at most one kind), read and checked before the bundle loads."""
    from mpt_export.runtime.constraints import Constraint

    given = [name for name, v in (("--json-schema", json_schema), ("--json-object", json_object),
                                  ("--choice", choice), ("--regex", regex), ("--grammar", grammar)) if v]
    if len(given) > 1:
        raise InputError(f"give one output constraint, got {' and '.join(given)}")
    if whitespace_pattern is not None and not (json_schema or json_object):
        raise InputError("--whitespace-pattern applies with --json-schema or --json-object")

    if json_schema:
        return Constraint.json_schema(read_text_option(json_schema, "--json-schema"), whitespace_pattern, param="--json-schema")
    if json_object:
        return Constraint.json_object(whitespace_pattern, param="--json-object")
    if choice:
        return Constraint.choice(choice, param="--choice")
    if regex is not None:
        return Constraint.regex(regex, param="--regex")
    if grammar:
        return Constraint.grammar(read_text_option(grammar, "--grammar"), param="--grammar")
    return None

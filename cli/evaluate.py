from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ._common import Quiet, console, escape, handle_errors, progress, quiet_libraries
from mpt_export.errors import InputError, NumericsError
from mpt_export.source.basemodel import base_arch
from mpt_export.source.hub import resolve
from mpt_export.tools.evaluate import BundleReference, evaluate, PeftReference, read_data


@handle_errors
def eval_cmd(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    data: Annotated[Path, typer.Option("--data", help='JSONL, one example per line: {"task"?, "prompt", "choices", "answer"} (multiple choice, scored by log-likelihood) or {"task"?, "prompt", "target"} (greedy generation, exact match).')],
    task: Annotated[str | None, typer.Option(help="The task of examples that name none.")] = None,
    against: Annotated[Path | None, typer.Option("--against", help="Compare with another bundle of the same tasks (e.g. the fp32 bundle a quantized one came from).")] = None,
    base_model: Annotated[str | None, typer.Option("--base-model", metavar="DIR|HUB_ID", help="Compare with PEFT itself over this base model (a directory or a Hugging Face Hub id) and the bundle's task vectors (needs the export extra).")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Generation examples: new tokens at most.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    quiet: Quiet = False,
) -> None:
    """Score a bundle's tasks on your own data: accuracy / exact match and mean log-likelihood per task, and against
    another bundle or PEFT the largest log-probability difference and greedy-token agreement."""
    import mpt_export

    if against is not None and base_model is not None:
        raise InputError("compare with one reference: --against BUNDLE or --base-model DIR")
    if max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    b = mpt_export.load_bundle(bundle)
    if b.task_type != "CAUSAL_LM":
        raise InputError("eval scores decoder-only bundles (prompt log-likelihoods); this one is an encoder-decoder")
    examples = read_data(data, task, b.tasks)
    s = b.session()
    ref, label = None, None
    if against is not None:
        other = mpt_export.load_bundle(against)
        missing = sorted({e.task for e in examples} - set(other.tasks))
        if missing:
            raise InputError(f"{against} has no task {', '.join(missing)}; compare bundles of the same tasks")
        ref, label = BundleReference(other.session()), str(against)
    elif base_model is not None:
        base_model = resolve(base_model, "base model")  # a Hub id: its snapshot in the cache
        base_arch(base_model)  # a wrong path answers now, not after torch loads
        label = "PEFT"
    with progress("eval", quiet) as on_step:
        if base_model is not None:
            on_step("load PEFT over the base model")
            quiet_libraries()
            ref = PeftReference(b, base_model)
        on_step(f"{len(examples)} examples" + (f", against {label}" if label else ""))
        figs = evaluate(s, examples, ref, max_new_tokens)
    failed = {name: f["error"] for name, f in figs.items() if "error" in f}
    if as_json:
        print(json.dumps({"bundle": str(bundle), "against": label, "tasks": figs}, indent=2, allow_nan=False))
    else:
        console.print(_table(figs, f"{bundle} on {data}" + (f" (against {label})" if label else ""), label))
    if failed:
        raise NumericsError(f"{len(failed)} of {len(figs)} task(s) failed, the others' figures are above: "
                            + "; ".join(failed.values()))


def _table(figs: dict, title: str, label: str | None) -> Table:
    t = Table(title=escape(title), title_justify="left")
    cols = ["task", "examples", "accuracy", "exact match", "mean log-lik."]
    if label:
        cols += ["max logprob diff", "agreement forced / free"]
    for c in cols:
        t.add_column(c, justify="left" if c == "task" else "right")
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    for name, f in figs.items():
        if "error" in f:
            t.add_row(escape(name), str(f["examples"]), *["[red]failed[/]"] * (len(cols) - 2))
            continue
        row = [escape(name), str(f["examples"]), pct(f["accuracy"]), pct(f["exact_match"]), f"{f['mean_loglik']:.3f}"]
        if label:
            agree = "-" if f["teacher_forced_agreement"] is None else \
                f"{pct(f['teacher_forced_agreement'])} / {pct(f['free_running_agreement'])}"
            row += [f"{f['max_logprob_diff']:.2e}", agree]
        t.add_row(*row)
    return t

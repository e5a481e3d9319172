"""Shared CLI plumbing: error handling, quiet third-party logging, progress, report tables."""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from mpt_export.errors import InputError, MptExportError
from mpt_export.export.quiet import silence_third_party
from mpt_export.storage.atomic import interrupted_message

STARTED = time.perf_counter()  # the command's start, as near as Python code sees it ("ready N s after ...")

# Piped output (logs, CI) gets 120 columns instead of rich's 80 so that report tables are not squeezed.
# emoji=False: ":thumbs_up:" in a prompt or a path is text, not an emoji; user and model text is escape()d everywhere
console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else 120, emoji=False)
err_console = Console(stderr=True, emoji=False)


def read_text_option(path, option: str, what: str = "") -> str:
    """The UTF-8 text of the file an option names, or one clear error naming the option (``what``: what the file
    should hold)."""
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {option} {path} ({getattr(e, 'strerror', None) or e}); give a UTF-8 text "
                         f"file{what}") from None


def handle_errors(fn):
    """Turn a library error into one red line and exit code 1 (never a traceback, never locals)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MptExportError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except BrokenPipeError:  # whoever read our output went away (`| head`): stop quietly, as Unix tools do
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
            raise typer.Exit(141) from None
        except OSError as e:  # the environment (disk full, permissions, a vanished file), not a bug of ours
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            err_console.print(f"[bold red]error:[/] {escape(str(e.strerror or e) + where)}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            err_console.print(f"[bold red]error:[/] interrupted; {escape(interrupted_message())}", highlight=False,
                              soft_wrap=True)
            raise typer.Exit(130) from None

    return wrapper


def quiet_libraries() -> None:
    """Exports run torch/transformers, which log progress bars and exporter chatter; keep the terminal ours."""
    silence_third_party()


# --quiet: for scripts; progress lines (stderr) off, the command's result and its errors still printed
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress lines: only the result (and errors).")]


@contextmanager
def progress(title: str, quiet: bool = False):
    """Yields an ``on_step(str)`` callback: each call starts a phase and ends the one before. On a terminal, a rich
    spinner with the elapsed time per phase; where stderr is redirected (CI, logs, ``| tee``), one flushed line when
    a phase starts and one when it ends, so a long phase is never silent. ``quiet``: nothing."""
    if quiet:
        yield lambda desc: None
    elif err_console.is_terminal:
        with _rich_progress(title) as on_step:
            yield on_step
    else:
        with _line_progress(title) as on_step:
            yield on_step


@contextmanager
def _rich_progress(title: str):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    # the time first, and a long phase name folded onto a second line: at 80 columns nothing is cut
    with Progress(SpinnerColumn(), TimeElapsedColumn(), TextColumn("{task.description}",
                                                                   table_column=Column(overflow="fold")),
                  console=err_console, transient=False) as prog:
        current = {"id": None}

        def on_step(desc: str) -> None:
            if current["id"] is not None:
                prog.update(current["id"], completed=1, total=1)
            current["id"] = prog.add_task(escape(f"{title}: {desc}"), total=None)

        yield on_step  # a failure leaves its phase's spinner stopped but unticked: the error line follows
        if current["id"] is not None:
            prog.update(current["id"], completed=1, total=1)


@contextmanager
def _line_progress(title: str, after_s: float = 1.0):
    """A phase still running after ``after_s`` gets its start line then (from a timer) and an end line when it ends;
    a shorter one prints nothing (a log of "0.0 s" lines hides the phases that matter)."""
    lock = threading.Lock()
    current: dict = {"desc": None, "t0": 0.0, "shown": False, "timer": None}

    def line(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def show(desc: str) -> None:
        with lock:
            if current["desc"] == desc and not current["shown"]:
                current["shown"] = True
                line(f"{title}: {desc} ...")

    def end() -> None:
        with lock:
            if current["timer"] is not None:
                current["timer"].cancel()
            if current["shown"]:
                line(f"{title}: {current['desc']}: done in {time.perf_counter() - current['t0']:.1f} s")
            current.update(desc=None, shown=False, timer=None)

    def on_step(desc: str) -> None:
        end()
        timer = threading.Timer(after_s, show, (desc,))
        timer.daemon = True
        with lock:
            current.update(desc=desc, t0=time.perf_counter(), timer=timer)
        timer.start()

    try:
        yield on_step
        end()
    finally:
        if current["timer"] is not None:
            current["timer"].cancel()


def parity_table(validation: dict | None) -> Table:
    dt = (validation or {}).get("dtype", "float32")
    t = Table(title=f"parity vs PEFT forward (fp32 reference, {dt} bundle)", title_justify="left",
              box=box.SIMPLE_HEAD, pad_edge=False)  # fits 80 columns
    for col in ("case", "task", "logits abs", "logits rel", "KV abs", "KV rel", "status"):
        t.add_column(col, justify="right" if col.endswith(("abs", "rel")) else "left", no_wrap=True)
    if not validation:
        t.add_row("-", "-", "-", "-", "-", "-", "not validated")
        return t
    fused = (validation.get("fast_graph") or {}).get("cases", [])
    for c in validation["cases"] + [dict(c, case=f"fused, {c['case']}") for c in fused]:
        ok = not c["failed"]
        t.add_row(c["case"], escape(c["task"]), f"{c['logits_max_abs']:.2e}", f"{c['logits_max_rel']:.2e}",
                  f"{c['kv_max_abs']:.2e}", f"{c['kv_max_rel']:.2e}", "[green]ok[/]" if ok else "[red]FAIL[/]")
    t.caption = (f"max |bundle - PEFT| (abs) and that / max|PEFT| (rel), per output; pass: abs <= atol "
                 f"{validation['atol']:g} + rtol {validation.get('rtol', 0):g} x max|PEFT|; fused: the fused graph; "
                 f"seed {validation['seed']}")
    t.caption_justify = "left"
    return t


def quant_line(quantization: dict) -> str:
    rep = quantization["report"]
    on = f" on {rep['on']}" if rep.get("on") else ""
    return (f"{quantization.get('scheme') or quantization['weights']} vs fp32{on}: greedy-token agreement {rep['greedy_agreement']:.1%} (teacher-forced, "
            f"{rep['tokens_compared']} tokens; free-running {rep['free_running_agreement']:.1%}), logits max abs diff "
            f"{rep['logits_max_abs']:.3g} (rel {rep['logits_max_rel']:.3g})")


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def size_table(bundle) -> Table:
    sizes = bundle.sizes()
    t = Table(title=escape(f"bundle {bundle.path}"), title_justify="left")
    t.add_column("component")
    t.add_column("bytes", justify="right")
    t.add_column("", justify="right")
    for k, v in sizes.items():
        t.add_row(k, str(v), human(v))
    t.add_row("[bold]total[/]", str(sum(sizes.values())), human(sum(sizes.values())))
    for task in bundle.info.tasks:
        nbytes = task.bytes or 0
        t.add_row(f"  task {escape(task.name)} (rank {task.rank})", str(nbytes), human(nbytes))
    n_shared = len({x.shared_prompt for x in bundle.info.tasks})
    t.caption = f"{len(bundle.tasks)} tasks over {n_shared} shared prompt(s); per-task bytes are cols + rows (fp32)"
    return t

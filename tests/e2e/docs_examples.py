"""The runner behind tests/e2e/test_docs.py: every example in README.md and docs/**/*.md, run as a reader would.

The rule. A fenced block whose info string is ``bash`` or ``python`` is an example and is run, unless the line right
before its fence is ``<!-- not run: REASON -->`` (a specific reason: what it needs, or which test covers it). Every
other block is output or a sample and is tagged ``text``, ``json``, ``yaml``, ``jsonl`` or ``toml``; untagged,
``sh``, ``shell`` or ``console`` blocks are refused, so no command slips past the runner by its tag.

How a page runs (:func:`run_page`). Its directory is laid out like the repository after ``make demo``: the tree the
real ``mpt-export demo --workdir build/demo`` wrote, copied in (pages change it: ``tasks add``, quantized copies). Its
blocks run in order, each bash command with ``bash -euo pipefail -c`` and every Python block with this interpreter,
the page directory as working directory and the interpreter's ``bin`` folder first on PATH. Special lines:

- ``make demo`` is not run: the copied demo tree stands for it. ``make test``, ``make check`` and ``make docs`` are
  not run either: the first two would run this suite inside itself, and test_docs.py builds the site itself
  (``mkdocs build --strict``). Any other ``make`` target must be in a block marked not run.
- ``mpt-export serve ... --port N &`` is started by the runner, in the background, on a free port (``--port 0``,
  the port read from the server's first line: it listens from then on, but answers 503 until the bundle is loaded);
  from then on every ``localhost:N`` / ``127.0.0.1:N`` in the page's blocks is rewritten to that port. The runner
  does not wait for the server to be ready: the page must, as its reader must — the rule asks for the command right
  after the serve line to poll ``/health`` (``until curl -sf .../health ...``). The runner stops every server it
  started when the page ends, failed or not, by its pid (SIGTERM, then SIGKILL).

A special line splits its bash block: the commands before it run in one ``bash -c``, those after in another.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

RUN = {"bash", "python"}
OUTPUT = {"text", "json", "jsonl", "yaml", "toml"}
NOT_RUN = re.compile(r"^\s*<!--\s*not run:\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
MAKE = re.compile(r"^\s*make\s+(?P<target>[\w-]+)")
MAKE_STANDS_FOR = {"demo": "the demo tree copied into the page's directory",
                   "test": "the test suite itself", "check": "the test suite itself",
                   "docs": "test_mkdocs_build_strict"}
SERVE = re.compile(r"^\s*(?:\w+=\S*\s+)*mpt-export\s+serve\b.*&\s*(?:#.*)?$")
BLOCK_TIMEOUT = 240
BIN = str(Path(sys.executable).parent)


@dataclass
class Block:
    page: str
    line: int  # of the opening fence, 1-based
    info: str
    code: str
    not_run: str | None  # the reason, when the line before the fence says so

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"

    @property
    def runs(self) -> bool:
        return self.info in RUN and self.not_run is None


def pages(root: Path) -> list[str]:
    """README.md and every Markdown page under docs/, relative to the repository root."""
    return ["README.md", *sorted(str(p.relative_to(root)) for p in (root / "docs").rglob("*.md"))]


def blocks(root: Path, page: str) -> list[Block]:
    """The page's fenced blocks, in order (indented fences too: their indent is taken off their lines)."""
    lines = (root / page).read_text().splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].strip()
        prev = NOT_RUN.match(lines[i - 1]) if i else None
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        out.append(Block(page, i + 1, info.split()[0] if info else "", "\n".join(body) + "\n",
                         prev.group(1) if prev else None))
        i = j + 1
    return out


def rule_violations(root: Path, page: str) -> list[str]:
    """What in ``page`` breaks the rule (see the module docstring), one line each."""
    bad = []
    text = (root / page).read_text().splitlines()
    fenced_after = {b.line - 1 for b in blocks(root, page)}  # 1-based line of the line before each fence
    for n, line in enumerate(text, 1):
        if NOT_RUN.match(line) and n not in fenced_after:
            bad.append(f"{page}:{n}: a not-run comment must be the line right before a fence")
    for b in blocks(root, page):
        if b.info not in RUN | OUTPUT:
            bad.append(f"{b.where}: info string {b.info or '(none)'!r}: examples are bash or python, output and "
                       f"samples {', '.join(sorted(OUTPUT))}")
        elif b.not_run is not None and b.info not in RUN:
            bad.append(f"{b.where}: a not-run comment on a {b.info} block (only bash/python blocks run)")
        elif b.not_run is not None and len(b.not_run.split()) < 3:
            bad.append(f"{b.where}: not-run reason {b.not_run!r} is not specific (what it needs, or which test runs it)")
        elif b.runs and b.info == "bash":
            cmds = commands(b.code)
            for i, cmd in enumerate(cmds):
                m = MAKE.match(cmd)
                if m and m["target"] not in MAKE_STANDS_FOR:
                    bad.append(f"{b.where}: `make {m['target']}` runs only in a block marked not run")
                if SERVE.match(cmd) and not (i + 1 < len(cmds) and "/health" in cmds[i + 1]):
                    bad.append(f"{b.where}: a server started with & must be waited for: the next command polls "
                               "/health (until curl -sf .../health ...)")
    return bad


def commands(script: str) -> list[str]:
    """A bash script's commands: a line with its backslash continuations and its heredoc bodies."""
    lines, out, i = script.splitlines(), [], 0
    while i < len(lines):
        cmd = [lines[i]]
        while cmd[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            cmd.append(lines[i])
        heredoc = re.search(r"<<-?\s*(['\"]?)(\w+)\1", "\n".join(cmd))
        if heredoc:
            while i + 1 < len(lines):
                i += 1
                cmd.append(lines[i])
                if lines[i].strip() == heredoc.group(2):
                    break
        out.append("\n".join(cmd))
        i += 1
    return [c for c in out if c.strip() and not c.lstrip().startswith("#")]


def start_server(command: str, cwd: Path, env: dict):
    """An ``mpt-export serve ... &`` line of a page, started on a free port (``--port 0``; the serving tests'
    :class:`servers.Server`, which reads the port from the server's first line and stops it by pid); ``asked`` is
    the port the page named."""
    from servers import Server

    words = shlex.split(re.sub(r"&\s*(#.*)?$", "", command.strip()))
    extra = {}
    while re.match(r"^\w+=", words[0]):
        k, _, v = words.pop(0).partition("=")
        extra[k] = v
    asked = int(words[words.index("--port") + 1]) if "--port" in words else 8000
    if "--port" in words:
        del words[words.index("--port"):words.index("--port") + 2]
    server = Server(None, argv=[*words, "--port", "0"], cwd=cwd, env={**env, **extra})
    server.asked = asked
    return server


class PageRun:
    """One page's examples, run in order in ``cwd`` (see the module docstring)."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "COLUMNS": "200"}
        self.servers: list = []  # servers.Server, each with the port its page asked for (.asked)
        self.ran: list[str] = []  # what ran, for the failure message

    def ports(self, text: str) -> str:
        for s in self.servers:
            text = re.sub(rf"\b(localhost|127\.0\.0\.1):{s.asked}\b", rf"\g<1>:{s.port}", text)
        return text

    def run_block(self, b: Block) -> None:
        if b.info == "python":
            script = self.cwd / f".docs-example-{b.line}.py"
            script.write_text(self.ports(b.code))
            self._run(b, [sys.executable, str(script)], b.code)
            return
        pending: list[str] = []
        for cmd in commands(b.code):
            make, serve = MAKE.match(cmd), SERVE.match(cmd)
            if make or serve:
                self._bash(b, pending)
                pending = []
            if make:
                assert make["target"] in MAKE_STANDS_FOR, f"{b.where}: make {make['target']} in a block that runs"
                self.ran.append(f"[skipped: {cmd.strip()} — stands for it: {MAKE_STANDS_FOR[make['target']]}]")
            elif serve:
                self.ran.append(f"[started by the runner] {cmd.strip()}")
                self.servers.append(start_server(self.ports(cmd), self.cwd, self.env))
            else:
                pending.append(cmd)
        self._bash(b, pending)

    def _bash(self, b: Block, cmds: list[str]) -> None:
        if cmds:
            script = self.ports("\n".join(cmds))
            self._run(b, ["bash", "-euo", "pipefail", "-c", script], script)

    def _run(self, b: Block, argv: list[str], shown: str) -> None:
        self.ran.append(shown)
        try:
            res = subprocess.run(argv, cwd=self.cwd, env=self.env, capture_output=True, text=True,
                                 timeout=BLOCK_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"{b.where}: timed out after {BLOCK_TIMEOUT} s:\n{shown}\n{e.stdout}\n{e.stderr}")
        if res.returncode != 0:
            logs = "".join(f"\n--- server on port {s.port}:\n{s.log()}" for s in self.servers)
            raise AssertionError(f"{b.where}: exit code {res.returncode}\n--- ran:\n{shown}\n--- stdout:\n"
                                 f"{res.stdout[-4000:]}\n--- stderr:\n{res.stderr[-4000:]}{logs}")

    def stop(self) -> None:
        for s in self.servers:
            s.stop()


def run_page(root: Path, page: str, cwd: Path) -> list[str]:
    """Run every example of ``page`` in ``cwd`` (already laid out); what ran, in order."""
    run = PageRun(cwd)
    try:
        for b in blocks(root, page):
            if b.runs:
                run.run_block(b)
    finally:
        run.stop()
    return run.ran

"""Every command's help page, rendered in-process as a user sees it: one form per thing (``--force``, ``BUNDLE``),
defaults as ``[default: ...]``, no type label on flags, provider lists that match what the command takes."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from mpt_export.cli import app

COMMANDS = ["inspect", "export", "verify", "quantize", "generate", "eval", "build", "check-trt", "serve", "triton",
            "bench", "bench-serve", "bench-export", "bench-structured", "demo", "tasks add", "tasks remove", "tasks list"]


def help_of(command: str) -> str:
    res = CliRunner().invoke(app, [*command.split(), "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert res.exit_code == 0, res.output
    return res.output


@pytest.mark.parametrize("command", COMMANDS)
def test_help_pages_are_consistent(command):
    text = help_of(command)
    usage = next(line for line in text.splitlines() if "Usage:" in line)
    assert "{" not in usage and "}" not in usage, usage  # BUNDLE, not {bundle}
    assert re.search(r"Usage: mpt-export [a-z -]+(\[OPTIONS\])", usage), usage
    assert "<bool>" not in text  # flags take no value: no type label
    assert "--no-force" not in text and "--no-quiet" not in text
    prose = re.sub(r"\[default: [^\]]*\]", "", text)
    assert not re.search(r"\(default[: ]|; default:|\[default", prose), command  # defaults in one form
    options = re.findall(r"(--[a-z][a-z0-9-]*)", text)
    assert "--help" in options


def test_long_commands_take_quiet_and_providers_match_what_is_accepted():
    for command in ("export", "quantize", "verify", "eval", "build", "bench", "bench-serve", "bench-export",
                    "bench-structured", "demo",
                    "generate", "triton"):
        assert "--quiet" in help_of(command), command
    from mpt_export.runtime.onnxruntime import PROVIDER_ALIASES

    for command in ("generate", "serve", "export"):
        line = re.sub(r"\s+", " ", help_of(command).split("--provider", 1)[1].split("[default", 1)[0])
        for alias in PROVIDER_ALIASES:
            assert alias in line, (command, alias, line)


def test_every_help_example_uses_options_its_command_has():
    """The examples at the end of each command's --help name only options that command takes, and every command
    but the task group's has some."""
    import shlex

    import typer

    from mpt_export.cli import EXAMPLES, WORKFLOW, app

    root = typer.main.get_command(app)
    names = [n for _, cmds in WORKFLOW for n, c in cmds if not isinstance(c, typer.Typer)]
    assert sorted(EXAMPLES) == sorted(names)
    for name, lines in EXAMPLES.items():
        sub = root.commands[name]
        opts = {o for p in sub.params for o in [*getattr(p, "opts", []), *getattr(p, "secondary_opts", [])]}
        for line in lines:
            words = shlex.split(line)
            assert words[:2] == ["mpt-export", name], line
            assert [w for w in words if w.startswith("--") and w not in opts] == [], line
        assert sub.epilog and lines[0] in sub.epilog

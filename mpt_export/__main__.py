"""The ``mpt-export`` console script: imports the CLI (typer, rich, every command module) inside a guard, so a
Ctrl-C while the program is still starting ends with one line instead of an import traceback."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from mpt_export.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted; nothing was written\n")
        sys.exit(130)
    cli_main()

"""MkDocs hook (mkdocs.yml `hooks:`): the CLI reference page is generated from the typer app itself.

`docs/reference/cli.md` holds the marker below; at build time it is replaced by the Markdown typer writes for
`mpt_export.cli:app` (what `typer mpt_export.cli utils docs --name mpt-export` prints), so the page always matches
`mpt-export --help`. Importing `mpt_export.cli` is light: no torch, no onnxruntime.

typer's top heading is `#`, its commands `##`, subcommands `###`: every heading moves one level down, under the
page's own title, so the page keeps one H1 and the table of contents (and the anchor check) sees every command.
"""

from __future__ import annotations

import re

MARKER = "<!-- mpt-export cli reference -->"
PAGE = "reference/cli.md"


def cli_markdown() -> str:
    """The typer-generated reference of `mpt-export`, its headings one level lower."""
    import typer
    from typer.cli import get_docs_for_click
    from typer.core import MARKUP_MODE_KEY

    from mpt_export.cli import app

    command = typer.main.get_command(app)
    _whole_summaries(command)
    ctx = typer.Context(command, info_name="mpt-export")
    ctx.obj = {MARKUP_MODE_KEY: app.rich_markup_mode}  # as `typer ... utils docs` does: rich markup becomes HTML
    text = get_docs_for_click(obj=command, ctx=ctx, name="mpt-export")
    text = re.sub(r" <list\[\w+\]>", "", text)  # a repeatable argument's Python type after its metavar (FILE...)
    return demote_headings(text.strip()) + "\n"


def _whole_summaries(command) -> None:
    """Each command's summary in a group's command list is its docstring's first paragraph, whole (click cuts a
    summary at 45 characters with "...")."""
    for sub in getattr(command, "commands", {}).values():
        if sub.help and not sub.short_help:
            sub.short_help = sub.help.split("\n\n")[0].replace("\n", " ")
        _whole_summaries(sub)


def demote_headings(text: str) -> str:
    """Every Markdown heading outside a fenced block one level lower (`#` -> `##`)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            line = "#" + line
        out.append(line)
    return "\n".join(out)


MODELS_MARKER = "<!-- mpt-export supported models -->"
MODELS_PAGE = "reference/supported-models.md"


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri == MODELS_PAGE:  # written from the family declarations
        from mpt_export.source.archs.table import supported_models_markdown

        if MODELS_MARKER not in markdown:
            raise ValueError(f"docs/{MODELS_PAGE} lost its marker {MODELS_MARKER}")
        return markdown.replace(MODELS_MARKER, supported_models_markdown())
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"docs/{PAGE} lost its marker {MARKER}: the CLI reference would not be generated")
    return markdown.replace(MARKER, cli_markdown())


ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):(<code>)~?")


def on_page_content(html: str, page, config, files) -> str:
    """Docstrings cross-reference in reStructuredText roles (``:class:`~x.Y```), which the Python reference would
    show verbatim: keep the code, drop the role."""
    if page.file.src_uri != "reference/python.md":
        return html
    return ROLE.sub(r"\1", html)

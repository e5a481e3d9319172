"""Help pages in the form Unix tools and click use: ``Usage: mpt-export generate [OPTIONS] BUNDLE [PROMPTS]...``, no
type label on flags (``--force``, ``--help``: they take no value). Typer 0.2x prints required arguments as
``{bundle}``, every flag with a ``<bool>`` label and a described default as ``[default: (8)]``; those are its
rendering choices, changed here in one place (where a typer release lacks the hook, its own rendering stays)."""

from __future__ import annotations

import inspect


def conventional_help() -> None:
    from typer import core

    arg = getattr(core, "TyperArgument", None)
    if arg is not None and hasattr(arg, "_usage_display_name"):
        def usage_name(self) -> str:
            name = self.metavar or (self.name or "").upper()
            name = name if self.required else f"[{name}]"
            return name + ("..." if self.nargs != 1 else "")

        arg._usage_display_name = usage_name
    described = getattr(core, "_get_default_string", None)
    if described is not None:
        def default_string(obj, *, ctx, show_default_is_str, default_value):
            if show_default_is_str:  # a described default ("engines/<bundle name>"), shown as written
                return str(obj.show_default)
            return described(obj, ctx=ctx, show_default_is_str=show_default_is_str, default_value=default_value)

        core._get_default_string = default_string
    opt = getattr(core, "TyperOption", None)
    if opt is not None and hasattr(opt, "display_type_rich"):
        shown = opt.display_type_rich

        def display_type_rich(self, ctx):
            return None if self.is_flag and self.metavar is None else shown(self, ctx)

        opt.display_type_rich = display_type_rich


def unwrap_docstrings(app) -> None:
    """Command docstrings are wrapped at 120 columns in the source; rich help keeps their line breaks, so the
    command list and help pages would show ragged lines. Each paragraph becomes one line (the terminal wraps it)."""
    for group in [app, *(g.typer_instance for g in app.registered_groups)]:
        for info in group.registered_commands:
            text = info.help or inspect.getdoc(info.callback) or ""
            info.help = "\n\n".join(" ".join(p.split()) for p in text.split("\n\n"))

"""Shared CLI plumbing: the consoles, the one-line errors, the options a command was given."""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from rich.console import Console
from typer.core import TyperCommand, TyperGroup

from surgeon.errors import SurgeonError

console = Console(width=None if sys.stdout.isatty() else 160)
err_console = Console(stderr=True)


def _no_type(option: Any) -> Any:
    if option is not None and getattr(option, "is_flag", False) and option.metavar is None:
        option.metavar = ""  # a flag takes no value: no "<bool>" beside it in --help
    return option


class _Flags:
    """Shows a command's flags (and ``--help``) without a value type, and its arguments in
    the usage line as ``MODEL`` rather than ``{MODEL}``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for p in self.params:
            _no_type(p)

    def get_help_option(self, ctx: Any) -> Any:
        return _no_type(super().get_help_option(ctx))

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        return [re.sub(r"\{([^{}]*)\}", r"\1", p) for p in super().collect_usage_pieces(ctx)]


class Command(_Flags, TyperCommand):
    """A ``surgeon`` command."""


class Group(_Flags, TyperGroup):
    """The ``surgeon`` group."""


def report_error(exc: SurgeonError) -> int:
    """Print ``error: MESSAGE. hint: HINT`` as exactly one line on stderr; return 2."""
    text = " ".join(exc.message.split()).rstrip(".")
    hint = " ".join(exc.hint.split()) if exc.hint else ""
    print(f"error: {text}" + (f". hint: {hint}" if hint else ""), file=sys.stderr)
    return 2


def usage_error(exc: Any) -> SurgeonError:
    """A click usage error (bad value, unknown option, missing argument) as a one-line error."""
    text = exc.format_message()
    if text[:1].isupper() and text[1:2].islower():  # "Invalid value" -> "invalid value"
        text = text[0].lower() + text[1:]
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "surgeon"
    return SurgeonError(text, hint=f"see `{where} --help`")


def given_argv(ctx: Any, skip: set[str] = frozenset()) -> list[str]:
    """The options of ``ctx``'s command that the command line (or environment) set, spelled
    again as arguments: to re-run the same command elsewhere (e.g. under torchrun)."""
    argv: list[str] = []
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name)
        if p.name in skip or not p.opts or source is None or source.name == "DEFAULT":
            continue
        value = ctx.params.get(p.name)
        if getattr(p, "param_type_name", "option") == "argument":
            argv += [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
        elif getattr(p, "is_flag", False):
            argv.append(p.secondary_opts[0] if p.secondary_opts and not value else p.opts[-1])
        elif getattr(p, "multiple", False):
            for v in value or ():
                argv += [p.opts[-1], str(v)]
        elif value is not None:
            argv += [p.opts[-1], str(value)]
    return argv


def debug() -> bool:
    return os.environ.get("SURGEON_DEBUG", "") not in ("", "0")

"""The ``surgeon`` typer app. Commands live in their own modules; this file wires them.

Nothing here or in the command modules imports torch at the top: ``--help`` and
``--version`` answer at once, and each command imports what it needs when it runs.
"""

from __future__ import annotations

import logging
import sys
from typing import Annotated

import typer

from surgeon import __version__
from surgeon.errors import SurgeonError

from .common import Command, Group, debug, report_error, usage_error
from .fold import fold_command
from .insert import insert_command
from .inspect import inspect_params_command
from .online import online_command
from .report import report_command
from .train import train_command
from .tune import tune_command

HELP = (
    "fx-surgeon: insert learned shift/scale layers into any PyTorch model, train and inspect them."
)

app = typer.Typer(
    name="surgeon",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    cls=Group,
)
app.command("insert", cls=Command)(insert_command)
app.command("train", cls=Command)(train_command)
app.command("inspect-params", cls=Command)(inspect_params_command)
app.command("report", cls=Command)(report_command)
app.command("fold", cls=Command)(fold_command)
app.command("online", cls=Command)(online_command)
app.command("tune", cls=Command)(tune_command)


def _print_version(value: bool) -> None:
    if value:
        print(f"fx-surgeon {__version__}")
        raise typer.Exit()


@app.callback(help=HELP)
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="print the version and exit",
            is_eager=True,
            callback=_print_version,
        ),
    ] = False,
) -> None:
    pass


class _StderrNotes(logging.Handler):
    """Each record as one plain line on whatever ``sys.stderr`` is when it is emitted."""

    def emit(self, record: logging.LogRecord) -> None:
        print(record.getMessage(), file=sys.stderr)


def _show_library_notes() -> None:
    """The library's INFO lines (``decoding ... once into the cache``) as plain stderr lines."""
    log = logging.getLogger("surgeon")
    if not any(isinstance(h, _StderrNotes) for h in log.handlers):
        log.addHandler(_StderrNotes())
        log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: known errors become one line on stderr and exit code 2."""
    _show_library_notes()
    try:
        rv = app(args=argv, prog_name="surgeon", standalone_mode=False)
        if isinstance(rv, int):
            return rv
    except SurgeonError as exc:
        if debug():
            raise
        return report_error(exc)
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except Exception as exc:  # click's usage errors (typer may vendor its own click)
        if not (
            hasattr(exc, "format_message") and isinstance(getattr(exc, "exit_code", None), int)
        ):
            raise
        if type(exc).__name__ == "NoArgsIsHelpError" or debug():  # `surgeon` alone: the help
            exc.show()
            return exc.exit_code
        report_error(usage_error(exc))
        return exc.exit_code
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

"""The ``surgeon`` typer app. Commands live in their own modules; this file wires them."""

from __future__ import annotations

import sys

import typer

from surgeon.errors import SurgeonError

from .common import debug, report_error
from .fold import fold_command
from .insert import insert_command
from .inspect import inspect_params_command
from .online import online_command
from .report import report_command
from .train import train_command

app = typer.Typer(
    name="surgeon",
    help="fx-surgeon: insert learned shift/scale layers into any PyTorch model, train and inspect them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("insert")(insert_command)
app.command("train")(train_command)
app.command("inspect-params")(inspect_params_command)
app.command("report")(report_command)
app.command("fold")(fold_command)
app.command("online")(online_command)


@app.callback()
def _root() -> None:
    """fx-surgeon: insert learned shift/scale layers into any PyTorch model, train and inspect them."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: known errors become one line on stderr and exit code 2."""
    try:
        rv = app(args=argv, standalone_mode=False)
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
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            return exc.exit_code
        raise
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()

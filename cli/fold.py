"""``surgeon fold``: merge a saved model's shift/scale modules into adjacent layers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

import surgeon
from surgeon.errors import SurgeonError
from surgeon.rundir import RECORD_FILE, read_record

from .common import console, err_console

TOLERANCE = 1e-4  # relative to the largest output: beyond it the fold is reported inexact


def fold_command(
    model_dir: Annotated[
        Path,
        typer.Argument(
            help="a folder written by `surgeon insert -o`, `surgeon train` or save()",
            metavar="MODEL_DIR",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="write the folded model here (a new folder)", metavar="DIR"
        ),
    ],
    input_size: Annotated[
        str | None,
        typer.Option(help="C,H,W of the check input (default: the recorded one)", metavar="C,H,W"),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print one JSON object on stdout instead of tables"),
    ] = False,
    trust_code: Annotated[
        bool,
        typer.Option(
            "--trust-code", help="allow the saved model to run the .py file its record names"
        ),
    ] = False,
    base: Annotated[
        Path | None,
        typer.Option(
            help="for an adapter folder: the base weights it was trained on (.safetensors, "
            "or a folder holding model.safetensors)",
            metavar="WEIGHTS",
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="accept a --base whose sha256 differs from the recorded one"),
    ] = False,
) -> None:
    """Fold shift/scale modules into the neighbouring Linear/conv/BatchNorm where exact."""
    from surgeon.adapters import is_adapter

    if not is_adapter(model_dir):
        read_record(model_dir)  # a clear error for a folder that is not a saved model
    if output.resolve() == model_dir.resolve():
        raise SurgeonError(
            f"-o {output} is the input folder", hint="write the folded model to a new folder"
        )
    if output.exists() and any(output.iterdir()) and not (output / RECORD_FILE).exists():
        raise SurgeonError(
            f"refusing to write into {output}: it exists and is not a saved model",
            hint="choose an empty or new folder with -o",
        )
    model = surgeon.load(model_dir, trust_code=trust_code, base=base, force=force)
    size = _parse_size(input_size) if input_size is not None else None
    folded, report = surgeon.fold(model, input_size=size)
    diff, top = report.max_abs_diff, report.max_abs_output or 0.0
    exact = diff is not None and diff <= TOLERANCE * max(1.0, top)
    if not exact:
        raise SurgeonError(
            f"the folded model differs from the original by {diff:.3g} (max |output| {top:.3g}); nothing written",
            hint="this is a bug in fold: please report it with the folder",
        )
    surgeon.save(folded, output)
    if not report.entries:
        err_console.print(
            "[yellow]warning:[/] the model has no shift/scale modules: nothing to fold"
        )
    if as_json:
        print(json.dumps({**report.to_dict(), "exact": exact, "output": str(output)}))
        return
    _print_table(report)
    console.print(
        f"{report.count('folded')} folded, {report.count('scale folded')} scale-only, "
        f"{report.count('kept')} kept of {len(report.entries)} shift/scale modules; "
        f"modules {report.modules_before} -> {report.modules_after}; "
        f"max |Δoutput| {diff:.3g} (max |output| {top:.3g})"
        + " [green](exact to float tolerance)[/]"
    )
    console.print(
        f"saved to [bold]{escape(str(output))}[/] (surgery.json, model.safetensors, model_fx.py)"
    )


def _parse_size(text: str) -> list[int]:
    try:
        size = [int(s) for s in text.replace("x", ",").split(",")]
    except ValueError:
        size = []
    if not size or any(s <= 0 for s in size):
        raise SurgeonError(f"bad input size {text!r}", hint="write C,H,W, e.g. 3,32,32")
    return size


def _print_table(report: surgeon.FoldReport) -> None:
    table = Table(title="fold")
    for col in ("module", "action", "into", "why"):
        table.add_column(col)
    colours = {"folded": "green", "scale folded": "yellow", "kept": "red"}
    for e in report.entries:
        where = f"{e.direction}: {', '.join(e.into)}" if e.into else "-"
        action = f"[{colours[e.action]}]{e.action}[/]"
        table.add_row(escape(e.module), action, escape(where), escape(e.reason or ""))
    console.print(table)

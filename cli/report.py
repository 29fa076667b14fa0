"""``surgeon report``: figures and tables of training runs, in one folder to open and read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from surgeon.errors import AnalysisError

from .common import console, err_console


def report_command(
    folders: Annotated[
        list[Path],
        typer.Argument(
            help="run folders and/or recipe folders (written by surgeon train)",
            metavar="FOLDER",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "-o", "--output", help="folder for the PNGs, index.md and index.html", metavar="DIR"
        ),
    ] = Path("report"),
    target_err: Annotated[
        float | None,
        typer.Option(
            "--target-err",
            help="val error (a fraction, 0.3 = 30%) for 'epochs to target'; default: the best any run reaches + 0.05",
            metavar="ERR",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print one JSON object on stdout instead of tables"),
    ] = False,
) -> None:
    """Figures and tables of training runs: loss, error per epoch, probes, a summary.

    The training loss (EMA) per step, the error per epoch by variant and LR, the probes, and
    a summary table: best/final val error, epochs to a target error, diverged runs."""
    if target_err is not None and not 0 < target_err <= 1:
        raise AnalysisError(
            f"--target-err must be a fraction in (0, 1], got {target_err:g}",
            hint="write 0.25 for 25%",
        )
    from surgeon import analysis
    from surgeon.analysis.report import summary_table, variant_table

    report = analysis.build_report(folders, output, target_err=target_err)
    if as_json:
        print(json.dumps(analysis.jsonable(report), allow_nan=False))
        return
    for w in report["warnings"]:
        err_console.print(f"[yellow]warning:[/] {escape(w)}")
    experiments = sorted({r["experiment"] for r in report["runs"]})
    for title, (header, cells) in (
        ("runs", summary_table(report["runs"])),
        ("by cell: mean ± std over seeds", variant_table(report["variants"])),
    ):
        if len(experiments) == 1 and header[0] == "experiment":  # name it once, in the title
            header, cells = header[1:], [row[1:] for row in cells]
            title = f"{experiments[0]}: {title}"
        if title.endswith("runs") and "variant" in header:  # the run name holds the variant
            keep = [i for i, h in enumerate(header) if h != "variant"]
            header, cells = [header[i] for i in keep], [[row[i] for i in keep] for row in cells]
        table = Table(title=escape(title), title_justify="left")
        for h in header:
            text = h in ("run", "variant", "experiment", "status")
            table.add_column(
                h, justify="left" if text else "right", no_wrap=h in ("run", "variant")
            )
        for row in cells:
            style = "red" if "diverged" in row else None
            table.add_row(*(escape(c) for c in row), style=style)
        console.print(table)
    target = report["target_err"]
    if target is not None:
        console.print(f"target error {100 * target:.2f}% ({report['target_err_source']})")
    console.print(
        f"wrote {len(report['figures'])} figures, summary.csv and report.json; "
        f"open [bold]{escape(report['html'])}[/] in a browser (or {escape(report['index'])})"
    )


__all__ = ["report_command"]

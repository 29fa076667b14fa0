"""``surgeon insert``: put shift/scale modules after the input and every non-final activation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

import surgeon
from surgeon.modes import check_mode

from .common import console, err_console

if TYPE_CHECKING:
    from torch import nn


def insert_command(
    model: Annotated[
        str,
        typer.Argument(
            help="model.py[:name], timm:NAME, torchvision:NAME, allconv or mlp",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    shift: Annotated[
        str, typer.Option(help="none, element, channel or layer", metavar="MODE")
    ] = "layer",
    scale: Annotated[
        str, typer.Option(help="none, element, channel or layer", metavar="MODE")
    ] = "layer",
    include: Annotated[
        list[str],
        typer.Option(
            help="keep only sites whose kind or node-name glob matches (repeatable)",
            metavar="PATTERN",
        ),
    ] = [],  # noqa: B006
    exclude: Annotated[
        list[str],
        typer.Option(
            help="drop sites whose kind or node-name glob matches (repeatable)", metavar="PATTERN"
        ),
    ] = [],  # noqa: B006
    input_size: Annotated[
        str | None,
        typer.Option(
            help="C,H,W for shape propagation (default: the model's own)", metavar="C,H,W"
        ),
    ] = None,
    model_arg: Annotated[
        list[str],
        typer.Option(
            help="key=value passed to the model's constructor (repeatable)", metavar="KEY=VALUE"
        ),
    ] = [],  # noqa: B006
    leaf: Annotated[
        list[str],
        typer.Option(
            help="module class name the tracer must not enter (repeatable)", metavar="CLASS"
        ),
    ] = [],  # noqa: B006
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="write surgery.json, model.safetensors and model_fx.py here",
            metavar="DIR",
        ),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print one JSON object on stdout instead of tables"),
    ] = False,
    replace_norm: Annotated[
        bool,
        typer.Option(
            "--replace-norm",
            help="first replace every BatchNorm by a channel shift/scale equal to it in eval mode",
        ),
    ] = False,
    fallback: Annotated[
        str,
        typer.Option(
            help="when torch.fx cannot trace MODEL: auto (the default: insert at module level "
            "and say so, or fail if that reaches no activation), never (fail) or eager "
            "(always module level)",
            metavar="WHEN",
        ),
    ] = "auto",
    final: Annotated[
        str,
        typer.Option(
            help="which activations get no site: parametrised (those whose value reaches the "
            "output through no parametrised layer) or output (only the output itself, the "
            "thesis's rule)",
            metavar="RULE",
        ),
    ] = "parametrised",
    placement: Annotated[
        str,
        typer.Option(
            help="where the sites are: activations (the input and every non-final activation) "
            "or ssf (after every linear, conv and norm layer but the classifier)",
            metavar="WHERE",
        ),
    ] = "activations",
    check_limit: Annotated[
        int,
        typer.Option(
            help="run the identity check on real weights only for models up to this many "
            "parameters; larger ones are analysed on the meta device (no weights)",
            metavar="N",
        ),
    ] = 50_000_000,
) -> None:
    """Insert shift/scale modules into MODEL and report the sites."""
    check_mode(shift, "shift mode")
    check_mode(scale, "scale mode")
    import torch

    from surgeon.sites import check_final_rule, check_placement

    check_final_rule(final)
    check_placement(placement)
    from surgeon.models import parse_model_args
    from surgeon.summary import insertion_summary

    args = parse_model_args(model_arg)
    from surgeon.models import BUILTINS

    if model in BUILTINS:  # small: built at once (an init on meta costs torch a second import)
        sized = surgeon.build_model(model, args)
    else:
        with torch.device("meta"):  # the size first, without weights
            sized = surgeon.build_model(model, args)
    params = sum(p.numel() for p in sized.parameters())
    big = params > check_limit and not replace_norm  # replace_norm needs the real statistics
    skip = None
    if big:
        skip = f"{params:,} parameters > --check-limit {check_limit:,}"
        base = surgeon.build_model(model, args) if output is not None else sized
    else:
        base = sized if model in BUILTINS else surgeon.build_model(model, args)
    del sized
    replaced = None
    if replace_norm:
        base, replaced = _replace_norm(base, input_size, leaf)
    with warnings.catch_warnings():  # the eager-fallback warning is printed below, once
        warnings.simplefilter("ignore", UserWarning)
        gm = surgeon.insert(
            base, shift, scale, include=include, exclude=exclude, input_size=input_size,
            leaf=leaf, fallback=fallback, inplace=big, final=final, placement=placement,
        )  # fmt: skip
    summary = insertion_summary(
        None if big else base, gm, spec=model, shift=shift, scale=scale, params_model=params,
        skip_check=skip,
    )  # fmt: skip
    if skip:
        err_console.print(f"note: identity check at init skipped: {escape(skip)}", soft_wrap=True)
    if replaced is not None:
        summary["replace_norm"] = replaced
    if output is not None:
        surgeon.save(gm, output)
    if replaced is not None and not replaced["replaced"]:
        err_console.print("[yellow]warning:[/] --replace-norm: the model has no BatchNorm")
    for skip in (replaced or {}).get("skipped", []):
        err_console.print(
            f"[yellow]warning:[/] kept {escape(skip['module'])}: {escape(skip['reason'])}"
        )
    if not summary["sites"] and not (replaced and shift == scale == "none"):
        why = "both modes are none" if shift == scale == "none" else "no sites found"
        err_console.print(f"[yellow]warning:[/] {why}: nothing was inserted")
    for warning in gm.surgeon_record.warnings:  # one line each, never wrapped
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    if as_json:
        print(json.dumps(summary))
        return
    _print_table(summary)
    if replaced is not None:
        console.print(
            f"replaced {len(replaced['replaced'])} BatchNorm layer(s) by channel shift/scale; "
            f"max |Δoutput| in eval mode: {replaced['max_abs_diff']:.3g}"
        )
    if output is not None:
        console.print(f"saved to [bold]{output}[/] (surgery.json, model.safetensors, model_fx.py)")


def _replace_norm(base, input_size: str | None, leaf: list[str]) -> tuple[nn.Module, dict]:
    """``surgeon.replace_norm`` and what it did, with max |Δoutput| in eval mode."""
    from surgeon.discover import parse_input_size
    from surgeon.shapes import example_inputs_for
    from surgeon.verify import max_abs_diff_at_init

    rn = surgeon.replace_norm(base, input_size=input_size, leaf=leaf)
    inputs = example_inputs_for(parse_input_size(input_size, base))
    info = dict(rn.surgeon_record.replace_norm)
    info["max_abs_diff"] = max_abs_diff_at_init(base, rn, inputs)
    return rn, info


def _print_table(summary: dict) -> None:
    sites = summary["sites"]
    table = Table(title=f"{summary['model']}: shift={summary['shift']} scale={summary['scale']}")
    for col, justify in (("#", "right"), ("node", "left"), ("kind", "left"), ("target", "left"),
                         ("shape", "left"), ("shift params", "right"), ("scale params", "right")):  # fmt: skip
        table.add_column(col, justify=justify)
    for i, s in enumerate(sites):
        shape = "×".join("N" if d < 0 else str(d) for d in s["shape"])
        table.add_row(
            str(i),
            s["name"],
            s["kind"],
            s["target"],
            shape,
            f"{s['shift_params']:,}",
            f"{s['scale_params']:,}",
        )
    console.print(table)
    pct = 100.0 * summary["params_added"] / max(summary["params_model"], 1)
    diff = summary["max_abs_diff_at_init"]
    check = "not checked" if diff is None else f"{diff:g}"
    verdict = (
        "" if diff is None else " [green](identity)[/]" if diff == 0 else " [red](not identity)[/]"
    )
    console.print(
        f"{len(sites)} {'site' if len(sites) == 1 else 'sites'}, "
        f"{summary['params_added']:,} parameters added "
        f"({pct:.4f}% of {summary['params_model']:,}); max |Δoutput| at init: {check}{verdict}"
    )
    method = summary.get("method", "fx")
    how = {"fx": "the FX graph", "hybrid": "the FX graph + activation modules inside leaves",
           "eager": "activation modules only, no graph"}.get(method, method)  # fmt: skip
    console.print(f"method: {method} ({how})")
    if traced := summary.get("traced_with"):
        console.print(
            f"traced with an example call of {traced['example_inputs']}: its "
            f"{traced['decisions']} shape/dtype decisions are fixed in the graph, each guarded "
            "(docs/insert.md)"
        )
    for u in summary.get("unreached", []):
        console.print(
            f"[yellow]unreached:[/] {escape(u['target'])} x{u['calls']} at {escape(u['name'])}: "
            f"{escape(u['reason'])}"
        )


__all__ = ["insert_command"]

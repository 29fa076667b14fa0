"""``surgeon online``: batch-size-1 learning on a stream, with prequential accuracy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from surgeon.train.config import WINDOW

from .common import console

Opt = typer.Option


def online_command(
    recipe: Annotated[
        str, Opt(help="recipe name (see recipes/) or path to a .toml", metavar="RECIPE")
    ] = "online",
    variant: Annotated[
        list[str] | None,
        Opt(
            help="run these variants instead of the recipe's: plain, batchnorm, batchnorm-frozen, replace-norm, shift-MODE+scale-MODE (repeatable)",
            metavar="VARIANT",
        ),
    ] = None,
    replace_norm: Annotated[
        bool,
        Opt(
            "--replace-norm/--no-replace-norm",
            help="give every batchnorm variant a replace-norm sibling",
        ),
    ] = True,
    model: Annotated[
        str | None, Opt(help="model spec: allconv, mlp, timm:NAME, ...", metavar="MODEL")
    ] = None,
    model_arg: Annotated[
        list[str] | None,
        Opt(help="key=value for the model constructor (repeatable)", metavar="KEY=VALUE"),
    ] = None,
    stream: Annotated[
        int | None, Opt(help="samples streamed (one pass, fixed order)", metavar="N")
    ] = None,
    limit_test: Annotated[
        int | None, Opt(help="class-balanced subset of the test split", metavar="N")
    ] = None,
    lr: Annotated[float | None, Opt(help="learning rate (constant)", metavar="LR")] = None,
    seed: Annotated[
        int | None, Opt(help="seed of the init and the stream order", metavar="N")
    ] = None,
    data: Annotated[
        str | None, Opt(help="sample, cifar10, cifar100 or an ImageFolder path", metavar="DATA")
    ] = None,
    window: Annotated[
        int, Opt(help="samples in the windowed prequential accuracy", metavar="N")
    ] = WINDOW,
    warm_start: Annotated[
        int,
        Opt(
            help="first train a batchnorm model for this many epochs (mini-batches) on the images not streamed",
            metavar="EPOCHS",
        ),
    ] = 0,
    out: Annotated[Path, Opt(help="folder for runs", metavar="DIR")] = Path("runs"),
) -> None:
    """Learn online (batch size 1, one pass, test-then-train) and report accuracy vs samples seen."""
    from surgeon.models import parse_model_args
    from surgeon.train import load_recipe
    from surgeon.train.online import plan, run_plan

    flags: dict[str, Any] = {
        "model": model, "limit_train": stream, "limit_test": limit_test, "lr": lr, "seed": seed,
        "data": data,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    if model_arg is not None:
        overrides["model_args"] = parse_model_args(model_arg)
    elif model is not None:
        overrides["model_args"] = {}  # the recipe's model_args belong to the recipe's model
    r = load_recipe(recipe)
    runs = plan(
        r, overrides, variants=variant or (), replace_norm_too=replace_norm, warm_start=warm_start
    )
    folder = out / r.name
    results = run_plan(
        runs,
        folder,
        recipe_name=r.name,
        warm_start=warm_start,
        window=window,
        log=lambda text: console.print(escape(text)),
    )
    _print_table(results)
    console.print(f"results: {folder / 'results.json'}; plot them with `surgeon report {folder}`")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="online learning (batch size 1, one pass)")
    for col in ("variant", "lr", "samples", "online acc", "last window", "test acc", "status"):
        table.add_column(col)
    for s in results:
        status = s["status"] if not s.get("message") else f"{s['status']}: {s['message']}"
        table.add_row(
            escape(str(s["variant"])), f"{s['lr']:g}", str(s.get("samples") or 0),
            _pct(s.get("online_acc")), _pct(s.get("online_acc_last_window")),
            _pct(s.get("test_acc")), escape(status),
        )  # fmt: skip
    console.print(table)

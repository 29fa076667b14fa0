"""``surgeon tune``: search the learning rate of a recipe's variants with Ray Tune and ASHA."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from surgeon.errors import TrainError

from .common import console
from .train import _config_options, _given

Opt = typer.Option
SEARCH = "Search"


def tune_command(
    ctx: typer.Context,
    recipe: Annotated[
        str, Opt(help="recipe name (see recipes/) or path to a .toml", metavar="RECIPE")
    ],
    lr_min: Annotated[
        float, Opt(help="lowest LR (log-uniform range)", metavar="LR", rich_help_panel=SEARCH)
    ] = 0.003,
    lr_max: Annotated[
        float, Opt(help="highest LR (log-uniform range)", metavar="LR", rich_help_panel=SEARCH)
    ] = 0.3,
    trials: Annotated[
        int,
        Opt(
            help="LRs drawn per variant (each run with every seed)",
            metavar="N",
            rich_help_panel=SEARCH,
        ),
    ] = 8,
    seeds: Annotated[
        str | None,
        Opt(
            help="comma-separated seeds per LR (default: the recipe's)",
            metavar="S,S",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    grace_epochs: Annotated[
        int,
        Opt(help="ASHA: epochs before a trial can be stopped", metavar="N", rich_help_panel=SEARCH),
    ] = 1,
    reduction_factor: Annotated[
        float,
        Opt(help="ASHA: keep 1/X of the trials at each rung", metavar="X", rich_help_panel=SEARCH),
    ] = 3.0,
    search_seed: Annotated[
        int,
        Opt(help="seed of the LR draws (the same LRs again)", metavar="N", rich_help_panel=SEARCH),
    ] = 0,
    ray_address: Annotated[
        str | None,
        Opt(
            help="the Ray cluster to join (default: RAY_ADDRESS, or a local one)",
            metavar="ADDR",
            rich_help_panel=SEARCH,
        ),
    ] = None,
    cpus_per_trial: Annotated[
        float, Opt(help="CPU cores (threads) per trial", metavar="N", rich_help_panel=SEARCH)
    ] = 1.0,
    gpus_per_trial: Annotated[
        float,
        Opt(help="GPUs per trial (0.5: two trials per GPU)", metavar="N", rich_help_panel=SEARCH),
    ] = 0.0,
    concurrent: Annotated[
        int,
        Opt(
            help="trials at a time (0: as the cluster's resources allow)",
            metavar="N",
            rich_help_panel=SEARCH,
        ),
    ] = 0,
    out: Annotated[
        Path,
        Opt(
            help="folder; the search goes into OUT/<recipe>-lr/",
            metavar="DIR",
            rich_help_panel=SEARCH,
        ),
    ] = Path("runs"),
    **fields: Any,
) -> None:
    """Search each variant's learning rate: log-uniform draws, ASHA early stopping on the
    validation error per epoch; writes the best LR per variant, every trial's curve and a figure."""  # fmt: skip
    from surgeon.train import load_recipe
    from surgeon.train.tune import FIGURE_FILE, search_lr

    overrides = {k: v for k, v in fields.items() if _given(ctx, k)}
    if "model_args" in overrides:
        from surgeon.models import parse_model_args

        overrides["model_args"] = parse_model_args(overrides["model_args"])
    try:
        seed_list = [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError:
        raise TrainError(f"invalid --seeds {seeds!r}", hint="e.g. --seeds 0,1,2") from None
    r = load_recipe(recipe)
    folder = out / f"{r.name}-lr"
    if folder.is_dir() and any(p.name != ".tune" for p in folder.iterdir()):
        raise TrainError(f"{folder} already exists", hint="pass another --out")
    result = search_lr(
        r.configs(overrides), folder, lr_min=lr_min, lr_max=lr_max, trials=trials,
        seeds=seed_list, grace_epochs=grace_epochs, reduction_factor=reduction_factor,
        search_seed=search_seed, address=ray_address, cpus_per_trial=cpus_per_trial,
        gpus_per_trial=gpus_per_trial, concurrent=concurrent, recipe_name=r.name,
        on_trial=_trial_line,
    )  # fmt: skip
    table = Table(title=f"best LR per variant ({trials} LRs x {len(result['seeds'])} seed(s))")
    for col in ("variant", "best lr", "seed", "final val err", "stopped early"):
        table.add_column(col)
    for variant, d in result["variants"].items():
        b = d["best"]
        table.add_row(
            variant, f"{b['lr']:g}" if b else "-", str(b["seed"]) if b else "-",
            _pct(b["final_val_err"]) if b else "-", f"{sum(t['status'] == 'stopped' for t in d['trials'])}/{len(d['trials'])}",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"results: {folder / 'best_lr.json'}, {folder / 'trials.csv'}, {folder / FIGURE_FILE}"
    )


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _trial_line(info: dict[str, Any]) -> None:
    cfg, res = info["config"], info["result"]
    from surgeon.train.tune import round_lr

    what = (
        "failed"
        if info["error"]
        else f"epoch {res.get('epoch', '-')} val err {_pct(res.get('val_err'))}"
    )
    console.print(f"trial lr {round_lr(cfg['lr']):g} seed {cfg['seed']}: {what}")


def _signature() -> inspect.Signature:
    own = inspect.signature(tune_command, eval_str=True)
    fixed = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    ctx, rest = fixed[0], fixed[1:]
    config = [p for p in _config_options() if p.name not in ("lr", "name", "seed")]
    return own.replace(parameters=[ctx, *(p.replace(kind=p.KEYWORD_ONLY) for p in rest), *config])


tune_command.__signature__ = _signature()  # type: ignore[attr-defined]

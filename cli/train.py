"""``surgeon train``: train one variant, or a recipe's grid, on CIFAR-10/100 or a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from surgeon.errors import TrainError
from surgeon.models import parse_model_args
from surgeon.train import TrainConfig, load_recipe, resume, run_configs
from surgeon.train.progress import make_reporter

from .common import console

Opt = typer.Option


def train_command(
    recipe: Annotated[str | None, Opt(help="recipe name (see recipes/) or path to a .toml")] = None,
    model: Annotated[
        str | None,
        Opt(help="model spec: allconv, mlp, timm:NAME, torchvision:NAME, file.py[:name]"),
    ] = None,
    model_arg: Annotated[
        list[str] | None, Opt(help="key=value for the model constructor (repeatable)")
    ] = None,
    shift: Annotated[str | None, Opt(help="none, element, channel or layer")] = None,
    scale: Annotated[str | None, Opt(help="none, element, channel or layer")] = None,
    norm: Annotated[
        str | None, Opt(help="none or batchnorm (before each non-final activation)")
    ] = None,
    dropout: Annotated[
        bool | None, Opt("--dropout/--no-dropout", help="the built-in models' dropout")
    ] = None,
    data: Annotated[
        str | None, Opt(help="sample, cifar10, cifar100 or an ImageFolder path")
    ] = None,
    data_root: Annotated[
        str | None, Opt(help="where torchvision's CIFAR files live (default ./data)")
    ] = None,
    download: Annotated[
        bool | None, Opt("--download", help="let torchvision download CIFAR")
    ] = None,
    augment: Annotated[
        bool | None, Opt("--augment/--no-augment", help="random crop + flip")
    ] = None,
    epochs: Annotated[int | None, Opt(help="epochs")] = None,
    batch_size: Annotated[int | None, Opt(help="batch size")] = None,
    lr: Annotated[float | None, Opt(help="learning rate of the weights")] = None,
    ss_lr_mult: Annotated[
        float | None, Opt(help="LR multiplier of the shift/scale parameters")
    ] = None,
    ss_wd: Annotated[float | None, Opt(help="weight decay of the shift/scale parameters")] = None,
    ss_decay_to: Annotated[str | None, Opt(help="identity (scale->1, shift->0) or zero")] = None,
    momentum: Annotated[float | None, Opt(help="SGD momentum (thesis: 0.9)")] = None,
    nesterov: Annotated[bool | None, Opt("--nesterov", help="Nesterov momentum")] = None,
    wd: Annotated[float | None, Opt(help="weight decay of the weights")] = None,
    schedule: Annotated[str | None, Opt(help="constant, cosine or step")] = None,
    warmup_epochs: Annotated[float | None, Opt(help="linear warm-up, in epochs")] = None,
    seed: Annotated[int | None, Opt(help="seed of the init and the data order")] = None,
    precision: Annotated[str | None, Opt(help="fp32 or bf16 (CUDA autocast)")] = None,
    compile: Annotated[bool | None, Opt("--compile", help="torch.compile the model")] = None,
    ema: Annotated[float | None, Opt(help="coefficient of the training-loss EMA")] = None,
    probe: Annotated[
        bool | None, Opt("--probe", help="log per-site activation stats and gradient norms")
    ] = None,
    limit_train: Annotated[
        int | None, Opt(help="class-balanced subset of the training split")
    ] = None,
    limit_test: Annotated[int | None, Opt(help="class-balanced subset of the test split")] = None,
    checkpoint_every: Annotated[int | None, Opt(help="steps between mid-epoch checkpoints")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda")] = None,
    out: Annotated[Path, Opt(help="folder for runs")] = Path("runs"),
    name: Annotated[str | None, Opt(help="run folder name (single runs)")] = None,
    resume_run: Annotated[
        Path | None, Opt("--resume", help="continue the run in this folder")
    ] = None,
    quiet: Annotated[bool, Opt("--quiet", help="plain log lines instead of live bars")] = False,
    dry_run: Annotated[bool, Opt("--dry-run", help="list the runs without training")] = False,
) -> None:
    """Train the variants (plain, batchnorm, shift/scale) with the thesis's recipes."""
    flags: dict[str, Any] = {
        "model": model, "shift": shift, "scale": scale, "norm": norm, "dropout": dropout,
        "data": data, "data_root": data_root, "download": download, "augment": augment,
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "ss_lr_mult": ss_lr_mult, "ss_wd": ss_wd,
        "ss_decay_to": ss_decay_to, "momentum": momentum, "nesterov": nesterov, "wd": wd,
        "schedule": schedule, "warmup_epochs": warmup_epochs, "seed": seed, "precision": precision,
        "compile": compile, "ema": ema, "probe": probe, "limit_train": limit_train,
        "limit_test": limit_test, "checkpoint_every": checkpoint_every, "device": device,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    if model_arg:
        overrides["model_args"] = parse_model_args(model_arg)
    reporter = lambda: make_reporter(quiet)  # noqa: E731
    if resume_run is not None:
        if recipe is not None:
            raise TrainError(
                "--resume continues one run; it cannot be combined with --recipe",
                hint="drop --recipe",
            )
        changed = sorted(set(overrides) - {"epochs", "device"})
        if changed:
            raise TrainError(
                f"--resume uses the run's saved config; cannot change {', '.join(changed)}",
                hint="only --epochs and --device may be given with --resume",
            )
        summary = resume(resume_run, reporter=reporter(), overrides=overrides)
        _print_table([summary])
        return
    if download and (data or "sample") not in ("cifar10", "cifar100"):
        raise TrainError(
            "--download applies to --data cifar10 or cifar100",
            hint="drop --download for folders and the sample",
        )
    if recipe is not None:
        r = load_recipe(recipe)
        configs, folder, recipe_name = r.configs(overrides), out / r.name, r.name
        if name:
            raise TrainError(
                "--name names a single run; a recipe names its runs", hint="drop --name"
            )
    else:
        configs, folder, recipe_name = (
            [TrainConfig.from_dict({**overrides, "name": name or ""})],
            out,
            "",
        )
    if dry_run:
        _print_plan(configs, folder)
        return
    results = run_configs(configs, folder, recipe_name=recipe_name, reporter_factory=reporter)
    _print_table(results)
    if recipe is not None:
        console.print(f"results: {folder / 'results.csv'}")
    else:
        console.print(f"run folder: {folder / configs[0].name}")
    if any(r["status"] == "failed" for r in results):
        failed = [r for r in results if r["status"] == "failed"]
        for r in failed:
            console.print(f"[red]failed[/] {r['name']}: {r['message']}")
        if len(failed) == len(results):
            raise typer.Exit(1)


def _print_plan(configs: list[TrainConfig], folder: Path) -> None:
    table = Table(title=f"{len(configs)} run(s) into {folder}")
    for col in ("run", "model", "variant", "lr", "seed", "epochs", "batch", "data"):
        table.add_column(col)
    for c in configs:
        table.add_row(
            c.name,
            c.model,
            c.variant,
            f"{c.lr:g}",
            str(c.seed),
            str(c.epochs),
            str(c.batch_size),
            c.data,
        )
    console.print(table)


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="results")
    for col in ("variant", "lr", "seed", "final val err", "best val err", "best epoch", "status"):
        table.add_column(col)
    for r in sorted(
        results, key=lambda r: (r.get("lr") or 0, r.get("variant") or "", r.get("seed") or 0)
    ):
        status = (
            r["status"]
            if r["status"] != "diverged"
            else f"diverged at step {r['diverged_at_step']}"
        )
        table.add_row(
            str(r.get("variant")), f"{r.get('lr'):g}" if r.get("lr") is not None else "-", str(r.get("seed")),
            _fmt(r.get("final_val_err")), _fmt(r.get("best_val_err")), str(r.get("best_epoch") or "-"), status,
        )  # fmt: skip
    console.print(table)

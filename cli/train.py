"""``surgeon train``: train one variant, or a recipe's grid, on CIFAR-10/100 or a folder."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from surgeon.data.sources import resolve as resolve_source
from surgeon.errors import TrainError
from surgeon.models import parse_model_args
from surgeon.train import TrainConfig, load_recipe, resume, run_configs
from surgeon.train.distributed import env_info as dist_env_info
from surgeon.train.distributed import launch
from surgeon.train.engine import resolve_device
from surgeon.train.progress import make_reporter
from surgeon.train.queue import run_parallel, slots
from surgeon.train.variants import model_args_for

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
    tensorboard: Annotated[
        bool | None,
        Opt("--tensorboard", help="also write TensorBoard event files (needs tensorboard)"),
    ] = None,
    limit_train: Annotated[
        int | None, Opt(help="class-balanced subset of the training split")
    ] = None,
    limit_test: Annotated[int | None, Opt(help="class-balanced subset of the test split")] = None,
    checkpoint_every: Annotated[int | None, Opt(help="steps between mid-epoch checkpoints")] = None,
    device: Annotated[str | None, Opt(help="auto, cpu or cuda")] = None,
    accum_steps: Annotated[int | None, Opt(help="micro-batches per optimiser step")] = None,
    sync_bn: Annotated[
        bool | None, Opt("--sync-bn", help="SyncBatchNorm for the batchnorm variant under DDP")
    ] = None,
    pretrained: Annotated[
        bool | None, Opt("--pretrained", help="timm/torchvision pretrained weights (downloads)")
    ] = None,
    config: Annotated[
        Path | None, Opt(help="a JSON file with a resolved run config (as in a run's config.json)")
    ] = None,
    nproc: Annotated[int, Opt(help="processes for one run (DDP through torchrun)")] = 1,
    gpus: Annotated[
        str | None, Opt(help="comma-separated GPU ids: a recipe's runs spread over them")
    ] = None,
    runs_per_gpu: Annotated[int, Opt(help="concurrent runs per GPU with --gpus")] = 1,
    workers: Annotated[int, Opt(help="concurrent runs on CPU")] = 1,
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
        "compile": compile, "ema": ema, "probe": probe, "tensorboard": tensorboard, "limit_train": limit_train,
        "limit_test": limit_test, "checkpoint_every": checkpoint_every, "device": device,
        "accum_steps": accum_steps, "sync_bn": sync_bn, "pretrained": pretrained,
    }  # fmt: skip
    overrides = {k: v for k, v in flags.items() if v is not None}
    if model_arg:
        overrides["model_args"] = parse_model_args(model_arg)
    reporter = lambda: make_reporter(quiet)  # noqa: E731
    if dist_env_info().launched and dist_env_info().rank != 0:
        console.quiet = True  # only rank 0 prints
    if nproc > 1 or (nproc == 1 and "--nproc" in sys.argv):
        if recipe is not None or gpus or workers > 1:
            raise TrainError(
                "--nproc runs one run on several processes; not with --recipe, --gpus or --workers",
                hint="launch one run at a time",
            )
        if dist_env_info().launched:
            raise TrainError(
                "--nproc given inside a torchrun process", hint="use either torchrun or --nproc"
            )
        argv = _strip_nproc(sys.argv[1:])
        raise typer.Exit(launch(nproc, argv))
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
    if config is not None:
        if recipe is not None:
            raise TrainError(
                "--config gives one run; it cannot be combined with --recipe",
                hint="drop one of them",
            )
        configs, folder, recipe_name = [_config_from_file(config, overrides, name)], out, ""
    elif recipe is not None:
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
    if download and any(c.data not in ("cifar10", "cifar100") for c in configs):
        raise TrainError(
            "--download applies to --data cifar10 or cifar100",
            hint="drop --download for folders and the sample",
        )
    if dry_run:
        _print_plan(configs, folder)
        return
    _preflight(configs, folder)
    if gpus or workers > 1:
        gpu_ids = [int(g) for g in gpus.split(",")] if gpus else None
        results = run_parallel(
            configs,
            folder,
            slots(gpu_ids, runs_per_gpu, workers),
            recipe_name=recipe_name,
            on_done=_done_line,
        )
    else:
        results = run_configs(
            configs,
            folder,
            recipe_name=recipe_name,
            reporter_factory=reporter,
            strict=recipe is None,
        )
    _print_table(results)
    if recipe is not None:
        console.print(f"results: {folder / 'results.csv'}")
    else:
        console.print(f"run folder: {folder / configs[0].name}")
    if any(r["status"] == "failed" for r in results):
        failed = [r for r in results if r["status"] == "failed"]
        for r in failed:
            console.print(f"[red]failed[/] {escape(r['name'])}: {escape(str(r['message']))}")
        if len(failed) == len(results):
            raise TrainError(f"all {len(results)} runs failed", hint="see the messages above")


def _preflight(configs: list[TrainConfig], folder: Path) -> None:
    """Errors every run would hit, raised before any training (one line, exit 2)."""
    checked: set[tuple] = set()
    for c in configs:
        if c.precision == "bf16" and resolve_device(c.device).type != "cuda":
            raise TrainError(
                "--precision bf16 needs a CUDA device", hint="the CPU path runs in fp32"
            )
        model_args_for(c, 10, (3, 32, 32))  # --dropout with a model that has none
        run_dir = folder / c.name
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise TrainError(
                f"run folder {run_dir} already exists",
                hint="pass --resume RUN to continue it, or another --out or --name",
            )
        key = (c.data, c.data_root, c.download)
        if key not in checked:  # a missing dataset or a bad path, before any run starts
            checked.add(key)
            resolve_source(c.data, Path(c.data_root) if c.data_root else None, c.download)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def _config_from_file(path: Path, overrides: dict[str, Any], name: str | None) -> TrainConfig:
    if not path.is_file():
        raise TrainError(f"config file not found: {path}", hint="pass a run's config.json")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise TrainError(
            f"{path} is not valid JSON: {exc}", hint="pass a run's config.json"
        ) from exc
    d.pop("world_size", None)
    d.update(overrides)
    if name:
        d["name"] = name
    return TrainConfig.from_dict(d)


def _done_line(summary: dict[str, Any]) -> None:
    console.print(
        f"done {summary['name']}: {summary['status']} best val err {_fmt(summary.get('best_val_err'))}"
    )


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

"""``surgeon train``: train one variant, or a recipe's grid, on CIFAR-10/100 or a folder.

Every field of :class:`TrainConfig` with ``cli`` metadata becomes an option here: its help,
spelling and default come from the field, so a field is declared once.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shlex
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from surgeon import rundir
from surgeon.errors import TrainError
from surgeon.train.config import DATA, OPTIM, RUN, VARIANT, TrainConfig

from .common import console, given_argv

Opt = typer.Option
LAUNCH = "Recipe and launch"


def train_command(
    ctx: typer.Context,
    recipe: Annotated[
        str | None,
        Opt(
            help="recipe name (see recipes/) or path to a .toml",
            metavar="RECIPE",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    config: Annotated[
        Path | None,
        Opt(
            help="a JSON file with a resolved run config (as in a run's config.json)",
            metavar="FILE",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    variant: Annotated[
        str | None,
        Opt(
            help="a single run's variant by name: plain, batchnorm, shift-layer+scale-layer, "
            "batchnorm+scale-channel, ... (instead of --norm/--shift/--scale)",
            metavar="NAME",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    nproc: Annotated[
        int,
        Opt(
            help="processes for one run (DDP through torchrun)", metavar="N", rich_help_panel=LAUNCH
        ),
    ] = 1,
    gpus: Annotated[
        str | None,
        Opt(
            help="comma-separated GPU ids: a recipe's runs spread over them",
            metavar="IDS",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    runs_per_gpu: Annotated[
        int, Opt(help="concurrent runs per GPU with --gpus", metavar="N", rich_help_panel=LAUNCH)
    ] = 1,
    workers: Annotated[
        int, Opt(help="concurrent runs on CPU", metavar="N", rich_help_panel=LAUNCH)
    ] = 1,
    backend: Annotated[
        str,
        Opt(
            help="local (this machine) or ray (a Ray cluster; pip install fx-surgeon[ray])",
            metavar="NAME",
            rich_help_panel=LAUNCH,
        ),
    ] = "local",
    ray_address: Annotated[
        str | None,
        Opt(
            help="--backend ray: the cluster to join (default: RAY_ADDRESS, or a local one)",
            metavar="ADDR",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    gpus_per_run: Annotated[
        float,
        Opt(
            help="--backend ray: GPUs per run (0.5: two runs per GPU)",
            metavar="N",
            rich_help_panel=LAUNCH,
        ),
    ] = 0.0,
    cpus_per_run: Annotated[
        float | None,
        Opt(
            help="--backend ray: CPU cores (torch threads) per run "
            "(default: a local run's threads, which gives its results bit for bit)",
            metavar="N",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    nnodes: Annotated[
        int,
        Opt(
            help="--nproc: nodes of one DDP run (torchrun, c10d rendezvous)",
            metavar="N",
            rich_help_panel=LAUNCH,
        ),
    ] = 1,
    node_rank: Annotated[
        int,
        Opt(
            help="--nnodes: this node's rank (0 for the first)", metavar="N", rich_help_panel=LAUNCH
        ),
    ] = 0,
    rdzv_endpoint: Annotated[
        str | None,
        Opt(
            help="--nnodes: HOST:PORT of the rendezvous, the same on every node",
            metavar="HOST:PORT",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    out: Annotated[Path, Opt(help="folder for runs", metavar="DIR", rich_help_panel=LAUNCH)] = Path(
        "runs"
    ),
    resume_run: Annotated[
        Path | None,
        Opt(
            "--resume",
            help="continue the run in this folder",
            metavar="RUN",
            rich_help_panel=LAUNCH,
        ),
    ] = None,
    quiet: Annotated[
        bool,
        Opt(
            "--quiet",
            help="plain log lines instead of live bars",
            rich_help_panel=LAUNCH,
        ),
    ] = False,
    dry_run: Annotated[
        bool,
        Opt("--dry-run", help="list the runs without training", rich_help_panel=LAUNCH),
    ] = False,
    trust_code: Annotated[
        bool,
        Opt(
            "--trust-code",
            help="with --resume or --config: allow the run's config to build its model from "
            "the .py file it names",
            rich_help_panel=LAUNCH,
        ),
    ] = False,
    **fields: Any,
) -> None:
    """Train the variants (plain, batchnorm, shift/scale) with the thesis's recipes."""
    from surgeon.train import distributed

    _check_trust(resume_run, config, trust_code)

    overrides = {k: v for k, v in fields.items() if _given(ctx, k)}
    if variant is not None:
        from surgeon.train.config import parse_variant

        clash = sorted({"norm", "shift", "scale"} & set(overrides))
        if clash:
            raise TrainError(
                f"--variant names the variant; it cannot be combined with --{', --'.join(clash)}",
                hint="give either --variant or --norm/--shift/--scale",
            )
        overrides.update(parse_variant(variant))
    name = overrides.pop("name", None)
    if "model_args" in overrides:
        from surgeon.models import parse_model_args

        overrides["model_args"] = parse_model_args(overrides["model_args"])
    dist = distributed.env_info()
    if dist.launched and dist.rank != 0:
        console.quiet = True  # only rank 0 prints
    if backend not in ("local", "ray"):
        raise TrainError(f"invalid --backend {backend!r}", hint="choose local or ray")
    if nproc > 1 or _given(ctx, "nproc") or nnodes > 1:  # --nproc 1 too: DDP at world size 1
        if recipe is not None or gpus or workers > 1 or backend != "local":
            raise TrainError(
                "--nproc runs one run on several processes; not with --recipe, --gpus or --workers",
                hint="launch one run at a time",
            )
        if dist.launched:
            raise TrainError(
                "--nproc given inside a torchrun process", hint="use either torchrun or --nproc"
            )
        skip = {"nproc", "nnodes", "node_rank", "rdzv_endpoint"}
        nodes = distributed.nodes_args(nnodes, node_rank, rdzv_endpoint)
        raise typer.Exit(
            distributed.launch(nproc, [ctx.info_name, *given_argv(ctx, skip=skip)], nodes=nodes)
        )
    from surgeon.train.engine import RunInterrupted

    try:
        code = _train(
            recipe,
            config,
            gpus,
            runs_per_gpu,
            workers,
            out,
            name,
            resume_run,
            quiet,
            dry_run,
            overrides,
            ray={"address": ray_address, "gpus_per_run": gpus_per_run, "cpus_per_run": cpus_per_run}
            if backend == "ray"
            else None,
        )
    except RunInterrupted as exc:
        if exc.resumable:
            line = f"interrupted; the last checkpoint is intact: surgeon train --resume {shlex.quote(str(exc.run))}"
        else:
            line = f"interrupted before the first checkpoint of {exc.run}; nothing to resume (start it again in a new folder)"
        print(line, file=sys.stderr)
        raise typer.Exit(130) from None
    except KeyboardInterrupt:  # before a run started (data, model): nothing was written
        print("interrupted before training started", file=sys.stderr)
        raise typer.Exit(130) from None
    if code:
        raise typer.Exit(code)


def _given(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _config_options() -> list[inspect.Parameter]:
    """One keyword option per :class:`TrainConfig` field with CLI metadata, its default the
    field's (shown in ``--help``). Only the options the command line sets override a recipe
    (their parameter source, see :func:`_given`)."""
    hints = typing.get_type_hints(TrainConfig)
    params = []
    for f in dataclasses.fields(TrainConfig):
        meta = f.metadata
        if "help" not in meta or meta.get("cli", True) is False:
            continue
        repeated = f.name == "model_args"  # key=value items, parsed by parse_model_args
        kind = list[str] if repeated else _strip_none(hints[f.name])
        default = [] if repeated else f.default
        single_flag = kind is bool and "/" not in meta.get("flag", "")
        option = Opt(
            meta.get("flag", "--" + f.name.replace("_", "-")),
            help=meta["help"],
            metavar=meta.get("metavar"),
            show_default=default not in (None, "", []) and not single_flag,
            rich_help_panel=meta.get("panel"),
        )
        annotation = Annotated[Optional[kind] if default is None else kind, option]
        params.append(
            inspect.Parameter(
                f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation
            )
        )
    order = {panel: i for i, panel in enumerate((VARIANT, DATA, OPTIM, RUN))}
    return sorted(params, key=lambda p: order.get(_panel(p), len(order)))


def _panel(param: inspect.Parameter) -> str | None:
    return typing.get_args(param.annotation)[1].rich_help_panel


def _strip_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _signature() -> inspect.Signature:
    own = inspect.signature(train_command, eval_str=True)
    fixed = [p for p in own.parameters.values() if p.kind is not p.VAR_KEYWORD]
    ctx, rest = fixed[0], fixed[1:]
    return own.replace(
        parameters=[ctx, *_config_options(), *(p.replace(kind=p.KEYWORD_ONLY) for p in rest)]
    )


train_command.__signature__ = _signature()  # type: ignore[attr-defined]


def _train(
    recipe: str | None,
    config: Path | None,
    gpus: str | None,
    runs_per_gpu: int,
    workers: int,
    out: Path,
    name: str | None,
    resume_run: Path | None,
    quiet: bool,
    dry_run: bool,
    overrides: dict[str, Any],
    ray: dict[str, Any] | None = None,
) -> int:
    """Run what the command asks; returns the exit code (3: a single run diverged)."""
    from surgeon.train import load_recipe, run_configs
    from surgeon.train.progress import make_reporter

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
        summaries = _resume_all(resume_run, overrides, reporter)
        if summaries:
            _print_table(summaries)
        return max((_diverged(x) for x in summaries), default=0)
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
    if overrides.get("download") and any(c.data not in ("cifar10", "cifar100") for c in configs):
        raise TrainError(
            "--download applies to --data cifar10 or cifar100",
            hint="drop --download for folders and the sample",
        )
    if dry_run:
        _print_plan(configs, folder)
        return 0
    if ray is not None and (gpus or workers > 1):
        raise TrainError(
            "--gpus and --workers are the local queue's; --backend ray places runs itself",
            hint="use --gpus-per-run with --backend ray",
        )
    if ray is not None:
        from surgeon.train.ray_backend import require_ray

        require_ray()  # one line before anything else when Ray is missing
    _preflight(configs, folder)
    if ray is not None:
        from surgeon.train.ray_backend import GridInterrupted, run_ray

        try:
            results = run_ray(configs, folder, recipe_name=recipe_name, on_done=_done_line, **ray)
        except GridInterrupted as exc:
            rows = f"; their rows are in {folder / rundir.RESULTS_FILE}" if exc.done else ""
            print(
                f"interrupted: {exc.cancelled} Ray task(s) cancelled (each run's last checkpoint "
                f"is intact), {exc.done} run(s) finished{rows}",
                file=sys.stderr,
            )
            return 130
    elif gpus or workers > 1:
        from surgeon.train.queue import run_parallel, slots

        gpu_ids = [int(g) for g in gpus.split(",")] if gpus else None
        try:
            results = run_parallel(
                configs,
                folder,
                slots(gpu_ids, runs_per_gpu, workers),
                recipe_name=recipe_name,
                on_done=_done_line,
            )
        except KeyboardInterrupt:
            print(
                f"interrupted: the running runs were stopped; continue one with "
                f"surgeon train --resume {folder}/RUN",
                file=sys.stderr,
            )
            return 130
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
        console.print(f"results: {folder / rundir.RESULTS_CSV}")
    else:
        console.print(f"run folder: {folder / configs[0].name}")
    if any(r["status"] == "failed" for r in results):
        failed = [r for r in results if r["status"] == "failed"]
        for r in failed:
            console.print(f"[red]failed[/] {escape(r['name'])}: {escape(str(r['message']))}")
        if len(failed) == len(results):
            raise TrainError(f"all {len(results)} runs failed", hint="see the messages above")
    return _diverged(results[0]) if recipe is None and len(results) == 1 else 0


def _diverged(summary: dict[str, Any]) -> int:
    """A diverged single run: one line on stderr saying which weights were kept; exit 3."""
    if summary.get("status") != "diverged":
        return 0
    print(f"diverged: {summary['name']}: {summary['message']}", file=sys.stderr)
    return 3


def _preflight(configs: list[TrainConfig], folder: Path) -> None:
    """Errors every run would hit, raised before any training (one line, exit 2)."""
    from surgeon.data.sources import resolve as resolve_source
    from surgeon.train.engine import resolve_device
    from surgeon.train.variants import model_args_for

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
    cols = ("run", "model", "variant", "lr", "ss lr x", "seed", "epochs", "batch", "data",
            "classes", "augment", "final", "val split")  # fmt: skip
    widest = max((len(c.name) for c in configs), default=3)
    for col in cols:  # run names whole (tests and scripts grep them), the rest may wrap
        table.add_column(col, no_wrap=col == "run", min_width=widest if col == "run" else None)
    for c in configs:
        table.add_row(
            c.name, _model_words(c), c.variant, f"{c.lr:g}", f"{c.ss_lr_mult:g}", str(c.seed),
            str(c.epochs), str(c.batch_size), c.data, str(c.classes or "any"),
            "on" if c.augment else "off", c.final, str(c.val_size) if c.val_size else "none (test)",
        )  # fmt: skip
    console.print(table)


def _model_words(c: TrainConfig) -> str:
    """The model spec, with the built-ins' variants spelled out (Springenberg's All-CNN-C)."""
    args = dict(c.model_args)
    if c.model == "allconv":
        net = "Springenberg" if args.pop("final_relu", True) else "no final ReLU"
        words = f"allconv ({net}{', dropout' if c.dropout else ''})"
    else:
        words = c.model + (" (dropout)" if c.dropout else "")
    return words + "".join(f" {k}={v}" for k, v in sorted(args.items()))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="results")
    for col in ("variant", "lr", "seed", "final val err", "best val err", "best epoch", "status"):
        table.add_column(col)
    for r in results:  # in the order the runs were given: the recipe's
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


def _epochs(n) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _resume_all(folder: Path, overrides: dict[str, Any], reporter) -> list[dict[str, Any]]:
    """``--resume``: one run folder, or every unfinished run under a grid's folder; a run
    that has nothing left to do says so instead of resuming."""
    from surgeon import rundir
    from surgeon.train import resume

    if (folder / rundir.CONFIG_FILE).is_file():
        runs = [folder]
    else:
        runs = [run for run, _ in rundir.iter_runs(folder)] if folder.is_dir() else []
        if not runs:
            raise TrainError(
                f"{folder} is not a run folder and holds no runs",
                hint="pass a run folder, or the folder of a recipe's grid",
            )
    summaries = []
    for run in runs:
        if _nothing_to_do(run, overrides):
            summary = rundir.read_summary(run, TrainError) or {}
            console.print(
                f"{escape(run.name)}: finished ({_epochs(summary.get('epochs_run'))}); "
                "nothing to do (give --epochs N to train it further)"
            )
            continue
        summaries.append(resume(run, reporter=reporter(), overrides=overrides))
    return summaries


def _nothing_to_do(run: Path, overrides: dict[str, Any]) -> bool:
    """The run finished all its epochs, and its newest checkpoint is intact and is the one
    its summary came from (a damaged one makes ``--resume`` train again from the last good)."""
    from surgeon import rundir
    from surgeon.train.checkpoint import find_checkpoint
    from surgeon.train.engine import ADDED_RUN_FIELDS, RUN_FIELDS

    summary = rundir.read_summary(run, TrainError)
    if summary is None or summary.get("status") != "ok":
        return False
    epochs = overrides.get("epochs", rundir.read_config(run, TrainError).get("epochs"))
    if not isinstance(epochs, int) or (summary.get("epochs_run") or 0) < epochs:
        return False
    try:
        found = find_checkpoint(run / rundir.CHECKPOINTS_DIR, RUN_FIELDS, ADDED_RUN_FIELDS)
    except TrainError:
        return False  # resume gives the one-line error
    saved = {k: v for k, v in rundir.read_config(run, TrainError).items() if k != "world_size"}
    recorded = {k: v for k, v in (found.state.get("config") or {}).items() if k != "world_size"}
    if saved != recorded:  # an edited config.json: resume refuses it with one line
        return False
    return not found.notes and found.state.get("step") == summary.get("steps")


def _check_trust(resume_run: Path | None, config: Path | None, trust_code: bool) -> None:
    """A config written elsewhere (a run folder's, or --config) that builds its model from a
    .py file runs that file: only with --trust-code. A model file named on the command line
    is the user's own and trusted."""
    if trust_code:
        return
    from surgeon import rundir
    from surgeon.trust import is_code_spec

    files: list[Path] = []
    if config is not None:
        files.append(config)
    if resume_run is not None:
        if (resume_run / rundir.CONFIG_FILE).is_file():
            files.append(resume_run / rundir.CONFIG_FILE)
        elif resume_run.is_dir():
            files += [run / rundir.CONFIG_FILE for run, _ in rundir.iter_runs(resume_run)]
    for path in files:
        try:
            spec = json.loads(path.read_text()).get("model", "")
        except (OSError, ValueError, AttributeError):
            continue  # the reader of that file gives the one-line error
        if isinstance(spec, str) and is_code_spec(spec):
            raise TrainError(
                f"{path} builds its model from {spec}; running it would run that file",
                hint="pass --trust-code if you trust it",
            )

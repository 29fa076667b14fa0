"""A learning-rate search with Ray Tune and ASHA early stopping (``surgeon tune``).

For each variant of a recipe, ``trials`` learning rates are drawn log-uniformly from
``[lr_min, lr_max]`` (rounded to 4 significant digits; a fixed ``search_seed`` draws the same
ones), each trained with every seed in ``seeds``. Each trial is an ordinary run folder under
``OUT/<recipe>-lr/``; its validation error is reported to Tune after every epoch (the
engine's per-epoch reporter hook), and ASHA stops the trials that fall behind at its rungs.
The variants are searched one after another, so a variant's trials compete only with each
other. Written next to the runs: ``best_lr.json``/``best_lr.csv`` (the best LR per variant),
``trials.json``/``trials.csv`` (every trial's curve) and ``lr_search.png`` (the validation
error against the LR per variant).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import TrainError
from .config import TrainConfig
from .progress import PlainReporter

BEST_FILE, BEST_CSV = "best_lr.json", "best_lr.csv"
TRIALS_FILE, TRIALS_CSV = "trials.json", "trials.csv"
FIGURE_FILE = "lr_search.png"
CURVE_FIELDS = (
    "variant",
    "run",
    "lr",
    "seed",
    "status",
    "epoch",
    "val_err",
    "val_loss",
    "train_loss",
)
BEST_FIELDS = ("variant", "lr", "seed", "run", "final_val_err", "best_val_err", "trials", "stopped")


def round_lr(lr: float) -> float:
    """4 significant digits: readable run names (``plain_lr0.01234_s0``)."""
    return float(f"{lr:.4g}")


class _TuneReporter(PlainReporter):
    """Logs to the trial's log file and reports each epoch's validation error to Tune."""

    def __init__(self, report: Callable[[dict[str, Any]], None], console: Any) -> None:
        super().__init__(console)
        self.report, self.last_epoch, self.held = report, 0, None

    def epoch(self, row: dict[str, Any]) -> None:
        super().epoch(row)
        self.last_epoch = row["epoch"]
        metrics = {k: row[k] for k in ("epoch", "val_err", "val_loss", "train_loss")}
        if row["epoch"] == self.epochs:  # the last: reported once the run folder is complete
            self.held = metrics  # (ASHA ends a trial at max_t as soon as it reports it)
        else:
            self.report(metrics | {"diverged": 0})


def _trainable(base: dict[str, Any], folder: str, cwd: str, cpus: float, gpus: float) -> Callable:
    def run_trial(config: dict[str, Any]) -> None:
        if os.path.isdir(cwd):
            os.chdir(cwd)
        if not gpus:
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        import torch
        from ray import tune
        from rich.console import Console

        from .engine import train

        torch.set_num_threads(max(int(cpus), 1))
        cfg = TrainConfig.from_dict(base).replace(lr=round_lr(config["lr"]), seed=config["seed"])
        run_dir = Path(folder) / cfg.name
        with open(Path(folder) / f".{cfg.name}.log", "a") as log:
            reporter = _TuneReporter(tune.report, Console(file=log, highlight=False, width=160))
            summary = train(cfg, run_dir, reporter=reporter)
        if reporter.held is not None:
            tune.report(reporter.held | {"diverged": 0})
        elif summary["status"] == "diverged":  # a last report: worse than any finite error
            tune.report(
                {"epoch": reporter.last_epoch + 1, "val_err": 1.0, "val_loss": math.inf}
                | {"train_loss": math.inf, "diverged": 1}
            )

    return run_trial


def search_lr(
    configs: list[TrainConfig],
    folder: Path,
    *,
    lr_min: float,
    lr_max: float,
    trials: int,
    seeds: list[int] | None = None,
    grace_epochs: int = 1,
    reduction_factor: float = 3.0,
    search_seed: int = 0,
    address: str | None = None,
    cpus_per_trial: float = 1.0,
    gpus_per_trial: float = 0.0,
    concurrent: int = 0,
    recipe_name: str = "",
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Search the LR of each variant in ``configs`` (one base config per variant: its first);
    return and write the per-variant best LR and every trial's curve into ``folder``."""
    from .ray_backend import connect, require_ray

    if not 0 < lr_min < lr_max:
        raise TrainError(
            f"need 0 < --lr-min < --lr-max, got {lr_min:g} and {lr_max:g}",
            hint="e.g. --lr-min 0.003 --lr-max 0.3",
        )
    if trials < 1:
        raise TrainError(f"--trials must be positive, got {trials}", hint="pass --trials 8")
    epochs = configs[0].epochs
    if not 1 <= grace_epochs <= epochs:
        raise TrainError(
            f"--grace-epochs {grace_epochs} is not in [1, {epochs}] (the runs' epochs)",
            hint="ASHA first compares the trials after this many epochs",
        )
    if reduction_factor <= 1:
        raise TrainError("--reduction-factor must be > 1", hint="ASHA keeps 1/factor per rung")
    ray = require_ray()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # Tune's tables off: one line per trial
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import BasicVariantGenerator

    bases: dict[str, TrainConfig] = {}
    for c in configs:
        bases.setdefault(c.variant, c)
    seeds = seeds if seeds else sorted({c.seed for c in configs})
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    started = connect(address)
    cwd = os.getcwd()
    out: dict[str, Any] = {
        "recipe": recipe_name, "lr_min": lr_min, "lr_max": lr_max, "trials": trials,
        "seeds": seeds, "epochs": epochs, "grace_epochs": grace_epochs,
        "reduction_factor": reduction_factor, "search_seed": search_seed, "variants": {},
    }  # fmt: skip
    callbacks = [_progress_callback(tune, on_trial)] if on_trial else []
    try:
        for k, (variant, cfg) in enumerate(bases.items()):
            trainable = tune.with_resources(
                _trainable(cfg.to_dict(), str(folder), cwd, cpus_per_trial, gpus_per_trial),
                {"cpu": cpus_per_trial, "gpu": gpus_per_trial},
            )
            space = {"lr": tune.loguniform(lr_min, lr_max), "seed": tune.grid_search(seeds)}
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                tune_config=tune.TuneConfig(
                    num_samples=trials,
                    scheduler=ASHAScheduler(
                        time_attr="epoch",
                        metric="val_err",
                        mode="min",
                        max_t=epochs,
                        grace_period=grace_epochs,
                        reduction_factor=reduction_factor,
                    ),
                    search_alg=BasicVariantGenerator(
                        random_state=search_seed + k, max_concurrent=concurrent
                    ),
                    reuse_actors=True,  # one torch import per worker, not per trial
                ),
                run_config=tune.RunConfig(
                    name=variant,
                    storage_path=str(folder / ".tune"),
                    verbose=0,
                    callbacks=callbacks,
                ),
            )
            grid = tuner.fit()
            rows = [_trial_row(cfg, folder, r.config, r.error) for r in grid]
            out["variants"][variant] = {"best": _best(rows), "trials": rows}
    finally:
        if started:
            ray.shutdown()
    write_outputs(folder, out)
    return out


def _progress_callback(tune: Any, on_trial: Callable[[dict[str, Any]], None]) -> Any:
    class Progress(tune.Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            on_trial({"config": trial.config, "result": trial.last_result or {}, "error": None})

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            on_trial({"config": trial.config, "result": trial.last_result or {}, "error": True})

    return Progress()


def _trial_row(
    base: TrainConfig, folder: Path, config: dict[str, Any], error: Any
) -> dict[str, Any]:
    cfg = base.replace(lr=round_lr(config["lr"]), seed=config["seed"])
    _, epochs, _, _ = rundir.read_metrics(folder / cfg.name)
    curve = [{k: e.get(k) for k in ("epoch", "val_err", "val_loss", "train_loss")} for e in epochs]
    summary = rundir.read_summary(folder / cfg.name) or {}
    if error is not None:
        status = "failed"
    elif summary.get("status") == "diverged":
        status = "diverged"
    elif len(curve) == cfg.epochs:
        status = "completed"
    else:
        status = "stopped"  # ASHA ended it at a rung
    errs = [c["val_err"] for c in curve]
    return {
        "run": cfg.name, "variant": cfg.variant, "lr": cfg.lr, "seed": cfg.seed,
        "status": status, "epochs": len(curve),
        "final_val_err": errs[-1] if errs else None, "best_val_err": min(errs) if errs else None,
        "curve": curve, "error": None if error is None else str(error).strip().splitlines()[0],
    }  # fmt: skip


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The completed trial with the lowest final validation error (else any with a value)."""
    pool = [r for r in rows if r["status"] == "completed"] or [
        r for r in rows if r["final_val_err"] is not None
    ]
    if not pool:
        return None
    best = min(pool, key=lambda r: (r["final_val_err"], r["lr"]))
    return {
        "lr": best["lr"], "seed": best["seed"], "run": best["run"],
        "final_val_err": best["final_val_err"], "best_val_err": best["best_val_err"],
        "trials": len(rows), "stopped": sum(r["status"] == "stopped" for r in rows),
    }  # fmt: skip


def write_outputs(folder: Path, out: dict[str, Any]) -> None:
    """``best_lr.json``/``.csv``, ``trials.json``/``.csv`` and ``lr_search.png``."""
    best = {v: d["best"] for v, d in out["variants"].items()}
    rundir.write_json_atomic(
        folder / BEST_FILE, {k: out[k] for k in out if k != "variants"} | {"best": best}
    )
    rundir.write_csv_atomic(
        folder / BEST_CSV,
        [{"variant": v, **b} for v, b in best.items() if b is not None],
        BEST_FIELDS,
    )
    rundir.write_json_atomic(folder / TRIALS_FILE, out)
    rows = []
    for d in out["variants"].values():
        for t in d["trials"]:
            for point in t["curve"] or [{}]:
                rows.append({k: t[k] for k in ("variant", "run", "lr", "seed", "status")} | point)
    rundir.write_csv_atomic(folder / TRIALS_CSV, rows, CURVE_FIELDS)
    plot(out, folder / FIGURE_FILE)


def plot(out: dict[str, Any], path: Path) -> None:
    """Validation error against LR, one panel per variant: filled = ran every epoch,
    hollow = stopped early by ASHA (its last value), x = diverged; the star is the best."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(out["variants"].items())
    fig, axes = plt.subplots(
        1, max(len(variants), 1), figsize=(4 * max(len(variants), 1), 3.4), squeeze=False,
        sharey=True,
    )  # fmt: skip
    for ax, (variant, d) in zip(axes[0], variants):
        for status, style in (
            ("completed", {"marker": "o", "color": "C0"}),
            ("stopped", {"marker": "o", "facecolors": "none", "edgecolors": "C1"}),
            ("diverged", {"marker": "x", "color": "C3"}),
        ):
            pts = [(t["lr"], t["final_val_err"]) for t in d["trials"] if t["status"] == status]
            pts = [(x, 1.0 if y is None else y) for x, y in pts]
            if pts:
                ax.scatter(*zip(*pts), label=status, **style)
        if d["best"]:
            ax.scatter(
                [d["best"]["lr"]],
                [d["best"]["final_val_err"]],
                marker="*",
                s=160,
                color="k",
                label=f"best {d['best']['lr']:g}",
            )
        ax.set_xscale("log")
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel(f"validation error (epoch {out['epochs']} or stop)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Running a recipe's grid: one run after another (or K at a time on CPU), a final table.

A run that fails or diverges is recorded and the others go on.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import rundir
from ..data import ImageData, load_data
from ..errors import SurgeonError
from .config import TrainConfig
from .distributed import env_info
from .engine import WrongData, check_data, train
from .progress import Reporter
from .recipes import Recipe
from .variants import build_base


def run_configs(
    configs: list[TrainConfig],
    out: Path,
    *,
    recipe_name: str = "",
    reporter_factory: Callable[[], Reporter] = Reporter,
    on_done: Callable[[dict[str, Any]], None] | None = None,
    strict: bool = False,
) -> list[dict[str, Any]]:
    """Train ``configs`` into ``out/<run name>/``; write ``results.json``/``results.csv``.

    With ``strict`` a :class:`SurgeonError` (bad data, existing folder...) propagates instead
    of being recorded as a failed run (the CLI's single runs: one error line, exit 2).
    ``out`` is made once a run has its data (a data error leaves no empty folder behind);
    runs already listed in its results are kept (see :func:`surgeon.rundir.write_results`)."""
    order = [c.name for c in configs] if recipe_name else None  # a recipe's order first
    datasets: dict[tuple, ImageData] = {}
    bases: dict[tuple, Any] = {}
    results = []
    for cfg in configs:
        run_dir = out / cfg.name
        try:
            dkey = (cfg.data, cfg.data_root, cfg.limit_train, cfg.limit_test, cfg.val_size)
            if dkey not in datasets:
                datasets[dkey] = load_data(
                    cfg.data,
                    cfg.data_root,
                    cfg.download,
                    limit_train=cfg.limit_train,
                    limit_test=cfg.limit_test,
                    val_size=cfg.val_size,
                )
            data = datasets[dkey]
            check_data(cfg, data)  # the wrong dataset for every run: stops the recipe
            size = tuple(data.train_x.shape[1:])
            bkey = (cfg.model, repr(sorted(cfg.model_args.items())), cfg.dropout, cfg.seed)
            if bkey not in bases:  # one base model per seed: every variant shares its init
                bases[bkey] = build_base(cfg, data.num_classes, size)
            summary = train(cfg, run_dir, data=data, base=bases[bkey], reporter=reporter_factory())
        except SurgeonError as exc:
            if strict or isinstance(exc, WrongData):
                raise
            summary = _failed(cfg, str(exc), run_dir)
        except Exception as exc:  # one broken run must not stop the others
            if env_info().launched:
                raise  # under torchrun a failed collective means the whole job is gone
            summary = _failed(cfg, f"{type(exc).__name__}: {exc}", run_dir)
            summary["traceback"] = traceback.format_exc()
        results.append(summary)
        if on_done:
            on_done(summary)
        write_results(out, recipe_name, results, order)
    return results


def _failed(cfg: TrainConfig, message: str, run_dir: Path) -> dict[str, Any]:
    summary = {k: None for k in rundir.SUMMARY_FIELDS}
    summary.update(
        name=cfg.name,
        variant=cfg.variant,
        lr=cfg.lr,
        seed=cfg.seed,
        status="failed",
        message=message,
        epochs_run=0,
    )
    if run_dir.is_dir():
        rundir.write_summary(run_dir, summary)
    return summary


def write_results(
    out: Path, recipe_name: str, results: list[dict[str, Any]], order: list[str] | None = None
) -> None:
    if env_info().rank == 0:  # under torchrun only rank 0 writes
        rundir.write_results(out, recipe_name, results, order)


def run_recipe(
    recipe: Recipe, out: Path, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    return run_configs(
        recipe.configs(overrides), out / recipe.name, recipe_name=recipe.name, **kwargs
    )

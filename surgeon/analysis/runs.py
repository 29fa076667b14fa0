"""Reading training runs for ``surgeon report``: config, metrics, summary, probes.

A run folder holds ``config.json``, ``metrics.jsonl`` (``step``, ``epoch`` and ``probe``
rows) and ``summary.json``; a recipe folder holds one run folder per grid point (and
``results.json``). Only JSON is read.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import rundir
from ..errors import AnalysisError
from ..rundir import RECORD_FILE, is_run_folder, read_metrics

__all__ = ["Run", "find_runs", "is_run_folder", "load_run", "load_runs", "read_metrics"]


@dataclass
class Run:
    """One training run, as its folder records it."""

    path: Path
    experiment: str
    config: dict[str, Any]
    summary: dict[str, Any]
    steps: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)
    sites: list[str] = field(default_factory=list)  # site names in depth order
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str(self.summary.get("name") or self.config.get("name") or self.path.name)

    @property
    def variant(self) -> str:
        return str(self.summary.get("variant") or self.config.get("variant") or "unknown")

    @property
    def lr(self) -> float | None:
        lr = self.summary.get("lr", self.config.get("lr"))
        return None if lr is None else float(lr)

    @property
    def seed(self) -> int | None:
        return self.summary.get("seed", self.config.get("seed"))

    @property
    def ema(self) -> float | None:
        return self.config.get("ema")

    @property
    def status(self) -> str:
        return str(self.summary.get("status") or "unknown")

    def val_errs(self) -> list[tuple[int, float]]:
        """``(epoch, val_err)`` of the completed epochs."""
        out = []
        for row in self.epochs:
            err = row.get("val_err")
            if err is None and row.get("val_acc") is not None:
                err = 1.0 - row["val_acc"]
            if err is not None and row.get("epoch") is not None:
                out.append((int(row["epoch"]), float(err)))
        return out


def _summary_from_metrics(
    config: dict[str, Any], epochs: list[dict[str, Any]], name: str
) -> dict[str, Any]:
    errs = [(r["epoch"], r["val_err"]) for r in epochs if r.get("val_err") is not None]
    finite = [(e, v) for e, v in errs if math.isfinite(v)]
    best = min(finite, key=lambda ev: ev[1]) if finite else (None, None)
    return {
        "name": config.get("name") or name,
        "variant": config.get("variant"),
        "lr": config.get("lr"),
        "seed": config.get("seed"),
        "status": "incomplete",
        "final_val_err": errs[-1][1] if errs else None,
        "best_val_err": best[1],
        "best_epoch": best[0],
        "epochs_run": epochs[-1].get("epoch") if epochs else 0,
        "diverged_at_step": None,
        "message": "no summary.json: the run did not finish",
    }


def load_run(folder: Path, experiment: str = "") -> Run:
    """Read one run folder."""
    folder = Path(folder)
    config = rundir.read_config(folder, AnalysisError)
    steps, epochs, probes, warnings = read_metrics(folder)
    summary = rundir.read_summary(folder, AnalysisError)
    if summary is None:
        summary = _summary_from_metrics(config, epochs, folder.name)
    sites: list[str] = []
    if (folder / RECORD_FILE).is_file():
        try:
            rec = json.loads((folder / RECORD_FILE).read_text())
            sites = [s["name"] for s in rec.get("sites", []) if isinstance(s, dict) and "name" in s]
        except (json.JSONDecodeError, AttributeError):
            warnings.append(f"{folder / RECORD_FILE}: not valid JSON")
    return Run(folder, experiment, config, summary, steps, epochs, probes, sites, warnings)


def find_runs(folder: Path) -> list[tuple[Path, str]]:
    """``(run folder, experiment)`` under ``folder``: the folder itself if it is a run, else
    the runs of a recipe folder, or of a folder of recipe folders."""
    folder = Path(folder)
    if not folder.exists():
        raise AnalysisError(
            f"{folder} does not exist",
            hint="pass a run folder or a recipe folder written by `surgeon train --out`",
        )
    if is_run_folder(folder):
        recipe = rundir.read_config(folder, AnalysisError).get("recipe")
        return [(folder, str(recipe or ""))]
    if not folder.is_dir():
        raise AnalysisError(
            f"{folder} is not a folder", hint="pass a run folder or a recipe folder"
        )
    return list(rundir.iter_runs(folder))


def load_runs(folders: list[Path]) -> list[Run]:
    """Every run under ``folders`` (each folder must hold at least one)."""
    if not folders:
        raise AnalysisError("no folder given", hint="pass run folders or recipe folders")
    runs, seen = [], set()
    for folder in folders:
        found = find_runs(folder)
        if not found:
            raise AnalysisError(
                f"{folder} holds no runs (no metrics.jsonl, summary.json or config.json in it or its subfolders)",
                hint="pass a run folder or a recipe folder written by `surgeon train --out`",
            )
        for path, experiment in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                runs.append(load_run(path, experiment))
    return runs

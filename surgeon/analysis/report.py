"""``surgeon report``: the thesis's figures and tables from run and recipe folders.

Writes into one folder: ``loss_<group>.png`` (training loss per step, EMA, epoch ends
marked), ``val_err_<group>.png`` (val and train error per epoch, one line per variant),
``probes_<group>.png`` (per-site activation stats and gradient norms, when the runs were
probed), ``summary.csv``, ``report.json`` and ``index.md`` / ``index.html`` that show them
all. A group is one learning rate of one experiment (recipe).
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..rundir import write_json_atomic
from .plots import SITE_AXIS, X_LABEL_INCHES, colors, figure, label_inches, plain_text, save, slug
from .runs import Run, load_runs
from .stats import jsonable, mean_std, sawtooth, within_spread

DEFAULT_MARGIN = 0.05  # default target error = best val error of any run + 5 points
PROBE_METRICS = {  # probe row key: y-axis label
    "act_mean": "activation mean",
    "act_std": "activation std",
    "grad_norm_before": "gradient norm, layer before",
    "grad_norm_after": "gradient norm, layer after",
    "step_before": "step size |dW|/|W|, layer before",
    "step_after": "step size |dW|/|W|, layer after",
}
ROW_FIELDS = (
    "run", "experiment", "variant", "tag", "lr", "seed", "status", "selected_on",
    "best_val_err", "best_epoch", "test_err_at_best", "final_val_err", "final_test_err",
    "final_train_err", "final_train_loss", "final_ema_loss", "boundary_rise", "mid_rise",
    "sawtooth", "epochs_run", "epochs_to_target",
    "diverged_at_step", "message", "path",
)  # fmt: skip
# config keys that do not make two runs different cells (seeds aggregate; the rest is
# bookkeeping or where the run happened)
NOT_A_CELL = {"name", "seed", "device", "world_size", "tensorboard", "checkpoint_every",
              "data_root", "download", "compile", "probe"}  # fmt: skip


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _pct(x: float | None, digits: int = 2) -> str:
    return f"{100 * x:.{digits}f}%" if _finite(x) else "-"


def variant_order(variants: set[str]) -> list[str]:
    """``plain`` and ``batchnorm`` first, then the shift/scale variants alphabetically."""
    first = [v for v in ("plain", "batchnorm") if v in variants]
    return first + sorted(v for v in variants if v not in first)


def epochs_to_target(run: Run, target: float | None) -> int | None:
    """The first completed epoch whose val error is at most ``target``."""
    if target is None:
        return None
    for epoch, err in run.val_errs():
        if _finite(err) and err <= target + 1e-12:
            return epoch
    return None


def summary_row(run: Run, target: float | None) -> dict[str, Any]:
    s, errs = run.summary, run.val_errs()
    finite = [(e, v) for e, v in errs if _finite(v)]
    best = s.get("best_val_err")
    best_epoch = s.get("best_epoch")
    if best is None and finite:
        best_epoch, best = min(finite, key=lambda ev: ev[1])
    final = s.get("final_val_err")
    if final is None and errs:
        final = errs[-1][1]
    # folders from before the validation hold-out: "val" was the test split, picked on it
    selected_on = s.get("selected_on") or run.config.get("val_size") and "val" or "test"
    at_best, final_test = s.get("test_err_at_best"), s.get("final_test_err")
    if selected_on == "test":
        at_best = best if at_best is None else at_best
        final_test = final if final_test is None else final_test
    last = run.epochs[-1] if run.epochs else {}
    return {
        "run": run.name,
        "experiment": run.experiment,
        "variant": run.variant,
        "tag": _tag(run),
        "lr": run.lr,
        "seed": run.seed,
        "status": run.status,
        "selected_on": selected_on,
        "best_val_err": best,
        "best_epoch": best_epoch,
        "test_err_at_best": at_best,
        "final_val_err": final,
        "final_test_err": final_test,
        "final_train_err": last.get("train_err"),
        "final_train_loss": last.get("train_loss"),
        "final_ema_loss": last.get("ema_loss"),
        **sawtooth(
            {int(r["step"]): r["loss"] for r in run.steps if _finite(r.get("loss"))},
            [int(r["step"]) for r in run.epochs if r.get("step") is not None],
        ),
        "cell": cell_key(run),
        "epochs_run": s.get("epochs_run", errs[-1][0] if errs else 0),
        "epochs_to_target": epochs_to_target(run, target),
        "diverged_at_step": s.get("diverged_at_step"),
        "message": s.get("message"),
        "path": str(run.path),
    }


_mean_std = mean_std  # the name this module used before stats.mean_std
AGG_KEYS = ("best_val_err", "test_err_at_best", "final_val_err", "final_test_err",
            "final_train_err", "final_ema_loss", "boundary_rise", "mid_rise", "sawtooth")  # fmt: skip


def cell_key(run: Run) -> str:
    """What makes runs one table cell: the config without the seed (and bookkeeping), so
    runs that differ only in seed aggregate and anything else keeps them apart."""
    config = {k: v for k, v in run.config.items() if k not in NOT_A_CELL}
    return json.dumps(config, sort_keys=True, default=str)


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per experiment, variant, case tag and LR (runs that differ only in seed): n, diverged
    runs, mean ± sample std of each error; ``within_spread`` marks a cell whose mean test
    error (at the epoch chosen on the selection split) is within the spread of the best cell
    of its experiment and LR (``|difference| < sqrt(std_a² + std_b²)``)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        key = (r["experiment"], r["variant"], r.get("tag") or "", r["lr"], r.get("cell", ""))
        groups[key].append(r)
    order = {v: i for i, v in enumerate(variant_order({r["variant"] for r in rows}))}
    out = []
    for (exp, variant, tag, lr, _), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][3] or 0, order[kv[0][1]], kv[0][2])
    ):
        reached = [r["epochs_to_target"] for r in rs if r["epochs_to_target"] is not None]
        a = {
            "experiment": exp, "variant": variant, "tag": tag, "lr": lr, "runs": len(rs),
            "seeds": sorted((r["seed"] for r in rs), key=str),
            "selected_on": "/".join(sorted({str(r.get("selected_on") or "test") for r in rs})),
            "diverged": sum(r["status"] == "diverged" for r in rs),
            "reached_target": len(reached),
            "epochs_to_target_mean": sum(reached) / len(reached) if reached else None,
        }  # fmt: skip
        for key in AGG_KEYS:
            values = [r.get(key) for r in rs]
            a[f"{key}_mean"], a[f"{key}_std"] = mean_std(values)
            a[f"{key}_n"] = sum(_finite(v) for v in values)
        out.append(a)
    _mark_spread(out)
    return out


def _mark_spread(agg: list[dict[str, Any]]) -> None:
    """``best_in_group`` and ``within_spread`` per cell, among the cells of one experiment
    and LR, on the mean test error at the selected epoch."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for a in agg:
        groups[(a["experiment"], a["lr"])].append(a)
    for cells in groups.values():
        scored = [a for a in cells if _finite(a["test_err_at_best_mean"])]
        best = min(scored, key=lambda a: a["test_err_at_best_mean"], default=None)
        for a in cells:
            a["best_in_group"] = a is best
            a["within_spread"] = (
                best is not None
                and a is not best
                and a in scored
                and within_spread(
                    (a["test_err_at_best_mean"], a["test_err_at_best_std"]),
                    (best["test_err_at_best_mean"], best["test_err_at_best_std"]),
                )
            )


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Runs by figure group (experiment and LR), keyed by a file-name-safe group name."""
    named = len({r.experiment for r in runs}) > 1 or any(r.experiment for r in runs)
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (r.experiment, r.lr or 0.0)):
        lr = "lr-unknown" if r.lr is None else f"lr{r.lr:g}"
        groups[slug(f"{r.experiment}_{lr}") if named and r.experiment else lr].append(r)
    return dict(groups)


def _group_title(runs: list[Run]) -> str:
    r = runs[0]
    lr = "?" if r.lr is None else f"{r.lr:g}"
    return f"{r.experiment + ', ' if r.experiment else ''}lr {lr}"


def _x_diverged(runs: list[Run]) -> str:
    """The title's key to the × marker, when a run has one."""
    return "; x: diverged" if any(r.status == "diverged" for r in runs) else ""


def _tag(run: Run) -> str:
    return str(run.config.get("tag") or "")


def line_label(run: Run) -> str:
    """A figure line's label: the variant, and the recipe case it belongs to (``m1``, ``m0.1``)
    when it has one, so two cases of one variant are two lines."""
    return run.variant + (f" [{_tag(run)}]" if _tag(run) else "")


def _line_order(runs: list[Run]) -> list[str]:
    """Line labels in :func:`variant_order`, the cases of a variant together."""
    rank = {v: i for i, v in enumerate(variant_order({r.variant for r in runs}))}
    keys = {line_label(r): (rank[r.variant], _tag(r)) for r in runs}
    return sorted(keys, key=keys.__getitem__)


def _by_variant(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[line_label(r)].append(r)
    return {v: out[v] for v in _line_order(runs)}


def _series(values: list[Any]) -> list[float]:
    return [float(v) if _finite(v) else math.nan for v in values]


@plain_text
def plot_loss(runs: list[Run], palette: dict[str, Any], path: Path) -> Path:
    """EMA training loss per step, one colour per variant, epoch ends as vertical lines."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = figure(1, 1, (9, 4.8))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1)
    emas = {r.ema for r in runs}
    shared_ema = emas.pop() if len(emas) == 1 else None
    tops = []
    for variant, rs in _by_variant(runs).items():
        color = palette[variant]
        for i, r in enumerate(rs):
            x = [row["step"] for row in r.steps]
            y = _series([row.get("ema_loss") for row in r.steps])
            raw = _series([row.get("loss") for row in r.steps])
            ax.plot(x, raw, color=color, alpha=0.2, linewidth=0.6)
            label = None
            if i == 0:
                label = variant + (f" ({len(rs)} runs)" if len(rs) > 1 else "")
                if shared_ema is None and r.ema is not None:
                    label += f", EMA {r.ema:g}"
            ax.plot(x, y, color=color, linewidth=1.3, label=label)
            first = next((v for v in y if math.isfinite(v)), None)
            if first is not None:
                tops.append(first)
            if r.status == "diverged" and x:
                ax.plot([x[-1]], [y[-1]], "x", color=color, markersize=9, markeredgewidth=2)
    longest = max(runs, key=lambda r: len(r.epochs))
    for i, row in enumerate(longest.epochs):
        if row.get("step") is not None:
            ax.axvline(row["step"], color="grey", linestyle=":", linewidth=0.7, label="epoch end" if i == 0 else None)  # fmt: skip
    if tops:
        ax.set_ylim(bottom=0, top=1.15 * max(tops))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    title = "EMA of the training loss" + (
        f", coefficient {shared_ema:g}" if shared_ema is not None else ""
    )
    ax.legend(fontsize=8, title=title, title_fontsize=8)
    ax.set_title(
        f"training loss per step ({_group_title(runs)}); faint: raw loss{_x_diverged(runs)}"
    )
    return save(fig, path)


def _mean_curve(rs: list[Run], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    per_epoch: dict[int, list[float]] = defaultdict(list)
    for r in rs:
        for row in r.epochs:
            v = row.get(key)
            if key == "val_err" and v is None and row.get("val_acc") is not None:
                v = 1.0 - row["val_acc"]
            if _finite(v) and row.get("epoch") is not None:
                per_epoch[int(row["epoch"])].append(100.0 * v)
    epochs = sorted(per_epoch)
    mean = [sum(per_epoch[e]) / len(per_epoch[e]) for e in epochs]
    return epochs, mean, [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs]


@plain_text
def plot_val_err(
    runs: list[Run], palette: dict[str, Any], target: float | None, path: Path
) -> Path:
    """Val error per epoch (solid) and train error (dotted), one line per variant; seeds
    are averaged with a min-max band."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = figure(1, 1, (9, 4.8))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1)
    held_out = all(row.get("select_split") == "val" for r in runs for row in r.epochs[:1])
    for variant, rs in _by_variant(runs).items():
        color = palette[variant]
        epochs, mean, lo, hi = _mean_curve(rs, "val_err")
        label = variant + (f" (mean of {len(rs)})" if len(rs) > 1 else "")
        if epochs:
            ax.plot(epochs, mean, "o-", color=color, markersize=3, label=label)
            if len(rs) > 1:
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.15, linewidth=0)
        t_epochs, t_mean, _, _ = _mean_curve(rs, "train_err")
        if t_epochs:
            ax.plot(t_epochs, t_mean, ":", color=color, linewidth=1.1)
        if held_out:
            s_epochs, s_mean, _, _ = _mean_curve(rs, "test_err")
            ax.plot(s_epochs, s_mean, "--", color=color, linewidth=1.0)
        for r in rs:
            errs = r.val_errs()
            if r.status == "diverged":
                e, v = errs[-1] if errs else (0, math.nan)
                ax.plot([e], [100 * v if _finite(v) else 90.0], "x", color=color, markersize=9, markeredgewidth=2)  # fmt: skip
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle="--", linewidth=0.8, label=f"target {100 * target:.1f}%")  # fmt: skip
    ax.plot([], [], "k-", label="val hold-out (solid)" if held_out else "test (solid)")
    if held_out:
        ax.plot([], [], "k--", label="test (dashed)")
    ax.plot([], [], "k:", label="train (dotted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"error per epoch ({_group_title(runs)}){_x_diverged(runs)}")
    return save(fig, path)


def _site_order(runs: list[Run]) -> list[str]:
    """Probed site names by depth: the probe rows' ``index`` when they carry one, else the
    order of the run's ``surgery.json`` sites, else the order the rows were written."""
    order: dict[str, tuple[float, int]] = {}
    n = 0
    for r in runs:
        listed = {name: i for i, name in enumerate(r.sites)}
        for p in r.probes:
            name = p.get("site")
            if name is None or name in order:
                continue
            index = p.get("index")
            if not _finite(index):
                index = listed.get(name, math.inf)
            order[name] = (float(index), n)
            n += 1
    return sorted(order, key=order.__getitem__)


def _probed_epoch(run: Run, which: str, metric: str | None = None) -> int | None:
    """The first or last epoch ``run`` was probed at (where ``metric`` has a value: a step
    size has none at epoch 0, before any step)."""
    epochs = sorted(
        {
            p["epoch"]
            for p in run.probes
            if p.get("epoch") is not None and (metric is None or _finite(p.get(metric)))
        }
    )
    if not epochs:
        return None
    return epochs[0] if which == "first" else epochs[-1]


def _probe_values(rs: list[Run], which: str, sites: list[str], metric: str) -> list[float]:
    """Mean over ``rs`` of ``metric`` per site, at each run's first or last probed epoch
    that has the metric."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        epoch = _probed_epoch(r, which, metric)
        if epoch is None:
            continue
        for p in r.probes:
            if p.get("epoch") == epoch and _finite(p.get(metric)):
                acc[p["site"]].append(float(p[metric]))
    return [sum(acc[s]) / len(acc[s]) if acc[s] else math.nan for s in sites]


def _epoch_label(runs: list[Run], which: str, metric: str | None = None) -> str:
    """``epoch 0 (init)`` / ``epoch 3`` when all runs agree, else ``first/last probed epoch``."""
    picked = {_probed_epoch(r, which, metric) for r in runs} - {None}
    if len(picked) != 1:
        return f"{which} probed epoch"
    (epoch,) = picked
    return "epoch 0 (init)" if epoch == 0 else f"epoch {epoch}"


@plain_text
def plot_probes(runs: list[Run], palette: dict[str, Any], path: Path) -> Path | None:
    """Activation mean/std, gradient norms and step sizes before/after each site, by depth;
    one line per variant; top row the first probed epoch, bottom row the last."""
    from matplotlib.ticker import LogFormatter

    probed = [r for r in runs if r.probes]
    if not probed:
        return None
    sites = _site_order(probed)
    cols = len(PROBE_METRICS)
    width = max(3.0 * cols, min(6.0 * cols, 0.5 * len(sites) * cols))
    label_in = label_inches(sites, fontsize=6) + X_LABEL_INCHES
    height = 6.5 + label_in
    fig, axes = figure(2, cols, (width, height))
    fig.subplots_adjust(left=0.75 / width, right=1 - 0.15 / width, top=1 - 0.6 / height, bottom=label_in / height, wspace=0.42, hspace=0.25)  # fmt: skip
    x = list(range(len(sites)))
    for row, which in enumerate(("first", "last")):
        for col, (metric, ylabel) in enumerate(PROBE_METRICS.items()):
            ax = axes[cols * row + col]
            for variant, rs in _by_variant(probed).items():
                y = _probe_values(rs, which, sites, metric)
                ax.plot(x, y, "o-", color=palette[variant], markersize=3, label=variant)
            if (
                metric.startswith(("grad", "step"))
                and ax.lines
                and all(v > 0 for line in ax.lines for v in line.get_ydata() if math.isfinite(v))
            ):
                ax.set_yscale("log")
                # plain-text tick labels: the default mathtext ones are slow to render
                ax.yaxis.set_major_formatter(LogFormatter())
                ax.yaxis.set_minor_formatter(
                    LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4))
                )
            ax.set_title(f"{metric} ({_epoch_label(probed, which, metric)})", fontsize=9)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.set_xticks(x)
            if row == 1:  # both rows show the same sites: label the bottom one
                ax.set_xticklabels(sites, rotation=60, ha="right", fontsize=6)
                ax.set_xlabel(SITE_AXIS, fontsize=8)
            else:
                ax.set_xticklabels([])
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"per-site probes by depth ({_group_title(runs)})", fontsize=10)
    return save(fig, path)


@plain_text
def plot_online(runs: list[Run], palette: dict[str, Any], path: Path) -> Path | None:
    """Online runs (``step`` rows with ``online_acc``, see :mod:`surgeon.train.online`):
    windowed (solid) and running (dotted) prequential accuracy against samples seen."""
    online = [
        r for r in runs if r.config.get("online") or any("online_acc" in s for s in r.steps[:1])
    ]
    if not online:
        return None
    fig, (ax,) = figure(1, 1, (9, 4.8))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1)
    for variant, rs in _by_variant(online).items():
        for i, r in enumerate(rs):
            x = [row["step"] for row in r.steps]
            label = variant if i == 0 else None
            if not x:
                label = f"{variant}: {r.status}" + (
                    f" ({r.summary['message']})" if r.summary.get("message") else ""
                )
                ax.plot([], [], "x", color=palette[variant], label=label[:90])
                continue
            win = _series([100 * row.get("online_acc_window", math.nan) for row in r.steps])
            run = _series([100 * row.get("online_acc", math.nan) for row in r.steps])
            ax.plot(x, win, color=palette[variant], linewidth=1.3, label=label)
            ax.plot(x, run, ":", color=palette[variant], linewidth=1.0)
    ax.set_xlabel("samples seen (batch size 1, one pass)")
    ax.set_ylabel("prequential accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"online accuracy ({_group_title(online)}); solid: window, dotted: all seen")
    return save(fig, path)


def _fmt(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    if key.endswith(("_err", "_err_mean", "err_at_best")):
        return _pct(v)
    if key.endswith("_loss"):
        return "-" if not _finite(v) else f"{v:.3f}"
    if key.endswith("_std"):
        return _pct(v) if v is not None else "-"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


SUMMARY_COLUMNS = (
    ("run", "run"), ("variant", "variant"), ("lr", "lr"), ("seed", "seed"),
    ("status", "status"), ("selected_on", "selected on"),
    ("best_val_err", "selection err (best)"), ("best_epoch", "best epoch"),
    ("test_err_at_best", "test err at best epoch"), ("final_test_err", "test err, last epoch"),
    ("final_train_err", "train err, last epoch"), ("final_ema_loss", "EMA loss, last step"),
    ("epochs_to_target", "epochs to target"), ("diverged_at_step", "diverged at step"),
)  # fmt: skip


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-run summary table (strings, as shown)."""
    cols = list(SUMMARY_COLUMNS)
    if any(r["experiment"] for r in rows):
        cols.insert(0, ("experiment", "experiment"))
    return [c[1] for c in cols], [[_fmt(r, k) for k, _ in cols] for r in rows]


def variant_table(agg: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-cell table (variant, case, LR): mean ± sample std over
    seeds, n; the test error at the epoch chosen on the selection split is marked (best) for
    the best cell of its experiment and LR and (≈) where within the spread of the best."""
    header = ["variant", "lr", "n", "diverged", "selected on", "selection err (best)",
              "test err at best epoch", "test err, last epoch", "train err, last epoch",
              "EMA loss, last step", "reached target", "mean epochs to target"]  # fmt: skip
    if any(a.get("tag") for a in agg):
        header.insert(1, "case")
    if any(a["experiment"] for a in agg):
        header.insert(0, "experiment")
    cells = []
    for a in agg:

        def pm(key, pct=True, a=a):
            m, s = a.get(f"{key}_mean"), a.get(f"{key}_std")
            show = _pct if pct else (lambda v: "-" if not _finite(v) else f"{v:.3f}")
            return show(m) + (f" ± {show(s)}" if s is not None else "")

        mark = " (best)" if a.get("best_in_group") else " (≈)" if a.get("within_spread") else ""
        row = [a["variant"], _fmt(a, "lr"), str(a["runs"]), str(a["diverged"]),
               a.get("selected_on", "test"), pm("best_val_err"), pm("test_err_at_best") + mark,
               pm("final_test_err"), pm("final_train_err"), pm("final_ema_loss", pct=False),
               f"{a['reached_target']}/{a['runs']}",
               "-" if a["epochs_to_target_mean"] is None else f"{a['epochs_to_target_mean']:.1f}"]  # fmt: skip
        if any(x.get("tag") for x in agg):
            row.insert(1, a.get("tag") or "-")
        if any(x["experiment"] for x in agg):
            row.insert(0, a["experiment"])
        cells.append(row)
    return header, cells


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in ROW_FIELDS})


def build_report(
    folders: list[Path],
    output: Path,
    *,
    target_err: float | None = None,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Read every run under ``folders``, write the figures, tables and index pages into
    ``output`` and return the report as a JSON-ready dict.

    The target error of "epochs to target" is ``target_err`` if given, else the best val
    error any run reaches plus ``margin`` (absolute, 0.05 = 5 points).
    """
    runs = load_runs([Path(f) for f in folders])
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    bests = [e for r in runs for _, e in r.val_errs() if _finite(e)]
    if target_err is not None:
        target, source = float(target_err), "given"
    elif bests:
        target, source = min(bests) + margin, f"best selection-split error {_pct(min(bests))} + {100 * margin:g} points"  # fmt: skip
    else:
        target, source = None, "no val errors recorded"
    variants = variant_order({r.variant for r in runs})
    rank = {v: i for i, v in enumerate(variants)}
    rows = sorted(
        (summary_row(r, target) for r in runs),
        key=lambda r: (
            r["experiment"],
            r["lr"] or 0.0,
            rank[r["variant"]],
            str(r["seed"]),
            r["run"],
        ),
    )
    agg = aggregate(rows)
    lines = _line_order(runs)
    pal = dict(zip(lines, colors(len(lines))))
    groups = group_runs(runs)
    figures: list[dict[str, str]] = []
    for name, rs in groups.items():
        title = _group_title(rs)
        figures.append({"kind": "loss", "group": title, "file": plot_loss(rs, pal, output / f"loss_{name}.png").name})  # fmt: skip
        figures.append({"kind": "val_err", "group": title, "file": plot_val_err(rs, pal, target, output / f"val_err_{name}.png").name})  # fmt: skip
        probe = plot_probes(rs, pal, output / f"probes_{name}.png")
        if probe is not None:
            figures.append({"kind": "probes", "group": title, "file": probe.name})
        online = plot_online(rs, pal, output / f"online_{name}.png")
        if online is not None:
            figures.append({"kind": "online", "group": title, "file": online.name})
    diverged = [r for r in rows if r["status"] == "diverged"]
    report = {
        "output": str(output),
        "index": str(output / "index.md"),
        "html": str(output / "index.html"),
        "folders": [str(f) for f in folders],
        "target_err": target,
        "target_err_source": source,
        "runs": rows,
        "variants": agg,
        "diverged": [r["run"] for r in diverged],
        "figures": figures,
        "warnings": [w for r in runs for w in r.warnings],
    }
    _write_csv(output / "summary.csv", rows)
    write_json_atomic(output / "report.json", jsonable(report))
    (output / "index.md").write_text(render_markdown(report))
    (output / "index.html").write_text(render_html(report))
    return report


_SECTIONS = (
    ("loss", "Training loss per step", "EMA of the per-step training loss (coefficient in the legend; faint lines are the raw loss). Dotted vertical lines mark the end of each epoch: the saw-tooth in the raw loss lines up with them."),
    ("val_err", "Error per epoch", "Selection-split error (solid: the validation hold-out, or the test split for runs without one), test error (dashed, when there is a hold-out) and training error (dotted) per epoch, one line per variant; several seeds are averaged, with a min-max band on the solid line."),
    ("probes", "Probes: activations and gradients by depth", "Per-site activation mean and std, and the gradient norms of the weights before and after each site, at the first probed epoch (epoch 0 is the init, before any step) and the last."),
    ("online", "Online learning: accuracy against samples seen", "Prequential accuracy of batch-size-1 runs (each sample predicted before it is trained on): over a sliding window (solid) and over all samples seen so far (dotted). Runs that failed at batch 1 are listed in the legend."),
)  # fmt: skip

# ----------------------------------------------------------------- the page
# index.md and index.html are two renderings of one list of blocks (_page), so they show
# the same content. Blocks: ("h", level, text), ("p", text), ("ul", [text, ...]),
# ("table", header, cells), ("img", alt, file), ("hr",). A text is a list of spans: a str
# (plain), ("em", s), ("code", s) or ("link", s, href). Every str may come from a run
# folder (run names, messages, experiment names): each renderer escapes all of them.

Span = str | tuple[str, ...]
TEXT_COLUMNS = {
    "run",
    "variant",
    "experiment",
    "status",
    "case",
    "selected on",
}  # left-aligned; the rest numbers


def _tables(report: dict[str, Any]) -> tuple[list[Span], tuple, tuple]:
    """The two tables; a single experiment is named once (returned) rather than per row."""
    tables = summary_table(report["runs"]), variant_table(report["variants"])
    experiments = sorted({r["experiment"] for r in report["runs"]})
    if len(experiments) != 1 or tables[0][0][0] != "experiment":
        return [], *tables
    named = [(h[1:], [row[1:] for row in cells]) for h, cells in tables]
    return [" of ", ("code", experiments[0])], *named


def _page(report: dict[str, Any]) -> list[tuple]:
    n, folders = len(report["runs"]), report["folders"]
    experiment, runs_table, variants_table = _tables(report)
    intro: list[Span] = [f"{n} run{'s' if n != 1 else ''}", *experiment, " from "]
    for i, f in enumerate(folders):
        intro += [", " if i else "", ("code", f)]
    intro.append(f"; {len(report['diverged'])} diverged.")
    target = report["target_err"]
    if target is not None:
        about = ["Target error for ", ("em", "epochs to target"), f": {_pct(target)} ({report['target_err_source']})."]  # fmt: skip
    else:
        about = ["No validation errors recorded."]
    blocks: list[tuple] = [("h", 1, ["Training report"]), ("p", intro), ("p", about)]
    blocks += [("h", 2, ["Summary"]), ("table", *runs_table)]
    blocks += [
        ("h", 2, ["By variant and learning rate"]),
        (
            "p",
            [
                "Mean ± sample std over the runs that differ only in seed (n of them). "
                "Selection err: the error on the split the best epoch was chosen on (val: the "
                "hold-out of the training split; test: folders without one). Test err at best "
                "epoch: the test split at that epoch; (best): the lowest mean of its "
                "experiment and LR; (≈): within the spread of it (|difference| < sqrt(std1² + "
                "std2²)): not a ranking."
            ],
        ),
        ("table", *variants_table),
        ("h", 2, ["Diverged runs"]),
    ]
    div = [r for r in report["runs"] if r["status"] == "diverged"]
    if div:
        blocks.append(("ul", [[("code", r["run"]), f": {r['message'] or 'diverged'}"] for r in div]))  # fmt: skip
    else:
        blocks.append(("p", ["None."]))
    for kind, title, text in _SECTIONS:
        figs = [f for f in report["figures"] if f["kind"] == kind]
        if not figs:
            continue
        blocks += [("h", 2, [title]), ("p", [text])]
        for f in figs:
            blocks += [("h", 3, [f["group"]]), ("img", f"{title}, {f['group']}", f["file"])]
    if report["warnings"]:
        blocks += [("h", 2, ["Warnings"]), ("ul", [[w] for w in report["warnings"]])]
    data = ["Data: ", ("link", "summary.csv", "summary.csv"), ", ", ("link", "report.json", "report.json"), "."]  # fmt: skip
    return blocks + [("hr",), ("p", data)]


def _one_line(s: Any) -> str:
    return re.sub(r"[\r\n\t\f\v]+", " ", str(s))


_MD_SPECIAL = re.compile(r"[\\`*\[\]<>|&]|^#|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])")


def md_escape(s: Any) -> str:
    """``s`` as literal markdown text on one line: the characters markdown would read as
    markup get a backslash (``_`` only at word edges: inside a word it is plain text)."""
    return _MD_SPECIAL.sub(lambda m: "\\" + m.group(0), _one_line(s))


def _md_code(s: Any) -> str:
    s = _one_line(s)
    fence = "`" * (max((len(t) for t in re.findall("`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return f"{fence}{pad}{s}{pad}{fence}"


def _md_text(spans: list[Span]) -> str:
    out = []
    for s in spans:
        if isinstance(s, str):
            out.append(md_escape(s))
        elif s[0] == "em":
            out.append(f"*{md_escape(s[1])}*")
        elif s[0] == "code":
            out.append(_md_code(s[1]))
        else:  # link
            out.append(f"[{md_escape(s[1])}]({s[2]})")  # hrefs are the report's own files
    return "".join(out)


def _md_block(block: tuple) -> str:
    kind = block[0]
    if kind == "h":
        return "#" * block[1] + " " + _md_text(block[2])
    if kind == "p":
        return _md_text(block[1])
    if kind == "ul":
        return "\n".join("- " + _md_text(item) for item in block[1])
    if kind == "table":
        header, cells = block[1], block[2]
        rule = ["---" if h in TEXT_COLUMNS else "---:" for h in header]
        rows = [map(md_escape, header), rule, *(map(md_escape, row) for row in cells)]
        return "\n".join("| " + " | ".join(row) + " |" for row in rows)
    if kind == "img":
        return f"![{md_escape(block[1])}]({block[2]})"  # a slug: no spaces or brackets
    return "---"  # hr


def render_markdown(report: dict[str, Any]) -> str:
    """``index.md``: the tables and the figures, as markdown."""
    return "\n\n".join(_md_block(b) for b in _page(report)) + "\n"


STYLE = """\
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
color:#1f2328;max-width:1200px;margin:2em auto;padding:0 1.2em}
h1{font-size:1.9em;margin:0 0 .4em;padding-bottom:.2em;border-bottom:1px solid #d8dee4}
h2{font-size:1.35em;margin:1.8em 0 .5em;padding-bottom:.15em;border-bottom:1px solid #e5e8eb}
h3{font-size:1.05em;margin:1.2em 0 .4em}
code{font:.88em ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;
background:#eff1f3;padding:.1em .35em;border-radius:4px}
.table{overflow-x:auto;margin:.6em 0}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #d0d7de;padding:4px 10px;text-align:left}
td{white-space:nowrap}
th{background:#f3f5f7;font-weight:600;vertical-align:bottom}
tbody tr:nth-child(even){background:#f9fafb}
tr.diverged td{background:#ffebe9;color:#82071e}
.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:.4em 0 1.4em}
img{max-width:100%;height:auto;border:1px solid #e5e8eb}
hr{border:0;border-top:1px solid #d8dee4;margin:2em 0 1em}
a{color:#0969da}"""


def _html_text(spans: list[Span]) -> str:
    e = html.escape
    out = []
    for s in spans:
        if isinstance(s, str):
            out.append(e(s))
        elif s[0] == "em":
            out.append(f"<em>{e(s[1])}</em>")
        elif s[0] == "code":
            out.append(f"<code>{e(s[1])}</code>")
        else:  # link
            out.append(f'<a href="{e(s[2])}">{e(s[1])}</a>')
    return "".join(out)


def _html_block(block: tuple) -> str:
    e, kind = html.escape, block[0]
    if kind == "h":
        return f"<h{block[1]}>{_html_text(block[2])}</h{block[1]}>"
    if kind == "p":
        return f"<p>{_html_text(block[1])}</p>"
    if kind == "ul":
        return "<ul>\n" + "\n".join(f"<li>{_html_text(i)}</li>" for i in block[1]) + "\n</ul>"
    if kind == "table":
        header, cells = block[1], block[2]
        cls = ["" if h in TEXT_COLUMNS else ' class="num"' for h in header]
        head = "".join(f"<th{c}>{e(h)}</th>" for h, c in zip(header, cls))
        status = header.index("status") if "status" in header else None
        rows = []
        for row in cells:
            diverged = (row[status] == "diverged") if status is not None else row[header.index("diverged")] not in ("0", "-")  # fmt: skip
            tr = '<tr class="diverged">' if diverged else "<tr>"
            rows.append(tr + "".join(f"<td{c}>{e(v)}</td>" for v, c in zip(row, cls)) + "</tr>")
        body = "\n".join(rows)
        return f'<div class="table"><table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table></div>'  # fmt: skip
    if kind == "img":
        alt, src = e(block[1]), e(block[2])
        return f'<figure><a href="{src}"><img src="{src}" alt="{alt}" title="{alt}"></a></figure>'
    return "<hr>"


def render_html(report: dict[str, Any]) -> str:
    """``index.html``: the same page as ``index.md``, rendered; one file (inline style, no
    script, fonts or other requests) that shows the PNGs beside it, offline."""
    head = (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>Training report</title>\n<style>\n{STYLE}\n</style>\n</head>\n<body>"
    )
    body = "\n".join(_html_block(b) for b in _page(report))
    return f"{head}\n{body}\n</body>\n</html>\n"

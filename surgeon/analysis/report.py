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
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ..rundir import write_json_atomic
from .plots import colors, figure, label_inches, save, slug
from .runs import Run, load_runs
from .stats import jsonable

DEFAULT_MARGIN = 0.05  # default target error = best val error of any run + 5 points
PROBE_METRICS = ("act_mean", "act_std", "grad_norm_before", "grad_norm_after")
ROW_FIELDS = (
    "run", "experiment", "variant", "lr", "seed", "status", "best_val_err", "best_epoch",
    "final_val_err", "epochs_run", "epochs_to_target", "diverged_at_step", "message", "path",
)  # fmt: skip


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
    return {
        "run": run.name,
        "experiment": run.experiment,
        "variant": run.variant,
        "lr": run.lr,
        "seed": run.seed,
        "status": run.status,
        "best_val_err": best,
        "best_epoch": best_epoch,
        "final_val_err": final,
        "epochs_run": s.get("epochs_run", errs[-1][0] if errs else 0),
        "epochs_to_target": epochs_to_target(run, target),
        "diverged_at_step": s.get("diverged_at_step"),
        "message": s.get("message"),
        "path": str(run.path),
    }


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if _finite(v)]
    if not values:
        return None, None
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per experiment, variant and LR: runs, diverged runs, mean ± sample std over seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["experiment"], r["variant"], r["lr"])].append(r)
    order = {v: i for i, v in enumerate(variant_order({r["variant"] for r in rows}))}
    out = []
    for (exp, variant, lr), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0], kv[0][2] or 0, order[kv[0][1]])
    ):
        best_m, best_s = _mean_std([r["best_val_err"] for r in rs])
        final_m, final_s = _mean_std([r["final_val_err"] for r in rs])
        reached = [r["epochs_to_target"] for r in rs if r["epochs_to_target"] is not None]
        out.append({
            "experiment": exp, "variant": variant, "lr": lr, "runs": len(rs),
            "diverged": sum(r["status"] == "diverged" for r in rs),
            "best_val_err_mean": best_m, "best_val_err_std": best_s,
            "final_val_err_mean": final_m, "final_val_err_std": final_s,
            "reached_target": len(reached),
            "epochs_to_target_mean": sum(reached) / len(reached) if reached else None,
        })  # fmt: skip
    return out


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


def _by_variant(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        out[r.variant].append(r)
    return {v: out[v] for v in variant_order(set(out))}


def _series(values: list[Any]) -> list[float]:
    return [float(v) if _finite(v) else math.nan for v in values]


def plot_loss(runs: list[Run], palette: dict[str, Any], path: Path) -> Path:
    """EMA training loss per step, one colour per variant, epoch ends as vertical lines."""
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
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    title = "EMA of the training loss" + (
        f", coefficient {shared_ema:g}" if shared_ema is not None else ""
    )
    ax.legend(fontsize=8, title=title, title_fontsize=8)
    ax.set_title(f"training loss per step ({_group_title(runs)}); faint: raw loss, x: diverged")
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


def plot_val_err(
    runs: list[Run], palette: dict[str, Any], target: float | None, path: Path
) -> Path:
    """Val error per epoch (solid) and train error (dotted), one line per variant; seeds
    are averaged with a min-max band."""
    from matplotlib.ticker import MaxNLocator

    fig, (ax,) = figure(1, 1, (9, 4.8))
    fig.subplots_adjust(left=0.07, right=0.98, top=0.93, bottom=0.1)
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
        for r in rs:
            errs = r.val_errs()
            if r.status == "diverged":
                e, v = errs[-1] if errs else (0, math.nan)
                ax.plot([e], [100 * v if _finite(v) else 90.0], "x", color=color, markersize=9, markeredgewidth=2)  # fmt: skip
    if target is not None:
        ax.axhline(100 * target, color="black", linestyle="--", linewidth=0.8, label=f"target {100 * target:.1f}%")  # fmt: skip
    ax.plot([], [], "k-", label="val (solid)")
    ax.plot([], [], "k:", label="train (dotted)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("error (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"error per epoch ({_group_title(runs)}); x: diverged")
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


def _probe_values(rs: list[Run], which: str, sites: list[str], metric: str) -> list[float]:
    """Mean over ``rs`` of ``metric`` per site, at each run's first or last probed epoch."""
    acc: dict[str, list[float]] = defaultdict(list)
    for r in rs:
        epochs = sorted({p.get("epoch") for p in r.probes if p.get("epoch") is not None})
        if not epochs:
            continue
        epoch = epochs[0] if which == "first" else epochs[-1]
        for p in r.probes:
            if p.get("epoch") == epoch and _finite(p.get(metric)):
                acc[p["site"]].append(float(p[metric]))
    return [sum(acc[s]) / len(acc[s]) if acc[s] else math.nan for s in sites]


def _epoch_label(runs: list[Run], which: str) -> str:
    """``epoch 0 (init)`` / ``epoch 3`` when all runs agree, else ``first/last probed epoch``."""
    picked = set()
    for r in runs:
        epochs = sorted({p["epoch"] for p in r.probes if p.get("epoch") is not None})
        if epochs:
            picked.add(epochs[0] if which == "first" else epochs[-1])
    if len(picked) != 1:
        return f"{which} probed epoch"
    (epoch,) = picked
    return "epoch 0 (init)" if epoch == 0 else f"epoch {epoch}"


def plot_probes(runs: list[Run], palette: dict[str, Any], path: Path) -> Path | None:
    """Activation mean/std and gradient norms before/after each site, by depth; one line
    per variant; top row the first probed epoch, bottom row the last."""
    from matplotlib.ticker import LogFormatter

    probed = [r for r in runs if r.probes]
    if not probed:
        return None
    sites = _site_order(probed)
    width = max(12.0, min(24.0, 0.5 * len(sites) * 4))
    label_in = label_inches(sites, fontsize=6)
    height = 6.5 + label_in
    fig, axes = figure(2, 4, (width, height))
    fig.subplots_adjust(left=0.05, right=0.99, top=1 - 0.6 / height, bottom=label_in / height, wspace=0.35, hspace=0.25)  # fmt: skip
    x = list(range(len(sites)))
    for row, which in enumerate(("first", "last")):
        for col, metric in enumerate(PROBE_METRICS):
            ax = axes[4 * row + col]
            for variant, rs in _by_variant(probed).items():
                y = _probe_values(rs, which, sites, metric)
                ax.plot(x, y, "o-", color=palette[variant], markersize=3, label=variant)
            if (
                metric.startswith("grad")
                and ax.lines
                and all(v > 0 for line in ax.lines for v in line.get_ydata() if math.isfinite(v))
            ):
                ax.set_yscale("log")
                # plain-text tick labels: the default mathtext ones are slow to render
                ax.yaxis.set_major_formatter(LogFormatter())
                ax.yaxis.set_minor_formatter(
                    LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.4))
                )
            ax.set_title(f"{metric} ({_epoch_label(probed, which)})", fontsize=9)
            ax.set_xticks(x)
            if row == 1:  # both rows show the same sites: label the bottom one
                ax.set_xticklabels(sites, rotation=60, ha="right", fontsize=6)
            else:
                ax.set_xticklabels([])
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"per-site probes by depth ({_group_title(runs)})", fontsize=10)
    return save(fig, path)


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
    if key.endswith("val_err") or key.endswith("val_err_mean"):
        return _pct(v)
    if key.endswith("_std"):
        return _pct(v) if v is not None else "-"
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


SUMMARY_COLUMNS = (
    ("run", "run"), ("variant", "variant"), ("lr", "lr"), ("seed", "seed"),
    ("status", "status"), ("best_val_err", "best val err"), ("best_epoch", "best epoch"),
    ("final_val_err", "final val err"), ("epochs_to_target", "epochs to target"),
    ("diverged_at_step", "diverged at step"),
)  # fmt: skip


def summary_table(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-run summary table (strings, as shown)."""
    cols = list(SUMMARY_COLUMNS)
    if any(r["experiment"] for r in rows):
        cols.insert(0, ("experiment", "experiment"))
    return [c[1] for c in cols], [[_fmt(r, k) for k, _ in cols] for r in rows]


def variant_table(agg: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the per-variant-and-LR table (mean ± sample std over seeds)."""
    header = ["variant", "lr", "runs", "diverged", "best val err", "final val err", "reached target", "mean epochs to target"]  # fmt: skip
    if any(a["experiment"] for a in agg):
        header.insert(0, "experiment")
    cells = []
    for a in agg:

        def pm(m, s):
            return _pct(m) + (f" ± {_pct(s)}" if s is not None else "")

        row = [a["variant"], _fmt(a, "lr"), str(a["runs"]), str(a["diverged"]),
               pm(a["best_val_err_mean"], a["best_val_err_std"]),
               pm(a["final_val_err_mean"], a["final_val_err_std"]),
               f"{a['reached_target']}/{a['runs']}",
               "-" if a["epochs_to_target_mean"] is None else f"{a['epochs_to_target_mean']:.1f}"]  # fmt: skip
        if any(x["experiment"] for x in agg):
            row.insert(0, a["experiment"])
        cells.append(row)
    return header, cells


def _md_table(header: list[str], cells: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in cells]
    return "\n".join(lines)


def _html_table(header: list[str], cells: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
        target, source = min(bests) + margin, f"best val error {_pct(min(bests))} + {100 * margin:g} points"  # fmt: skip
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
    pal = dict(zip(variants, colors(len(variants))))
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
    ("val_err", "Error per epoch", "Validation error (solid) and training error (dotted) per epoch, one line per variant; several seeds are averaged, with a min-max band."),
    ("probes", "Probes: activations and gradients by depth", "Per-site activation mean and std, and the gradient norms of the weights before and after each site, at the first probed epoch (epoch 0 is the init, before any step) and the last."),
    ("online", "Online learning: accuracy against samples seen", "Prequential accuracy of batch-size-1 runs (each sample predicted before it is trained on): over a sliding window (solid) and over all samples seen so far (dotted). Runs that failed at batch 1 are listed in the legend."),
)  # fmt: skip


def _header_lines(report: dict[str, Any]) -> list[str]:
    n = len(report["runs"])
    target = report["target_err"]
    return [
        f"{n} run{'s' if n != 1 else ''} from {', '.join(f'`{f}`' for f in report['folders'])}; "
        f"{len(report['diverged'])} diverged.",
        f"Target error for *epochs to target*: {_pct(target)} ({report['target_err_source']})."
        if target is not None
        else "No validation errors recorded.",
    ]


def render_markdown(report: dict[str, Any]) -> str:
    """``index.md``: tables and embedded figures."""
    lines = ["# Training report", "", *_header_lines(report), ""]
    lines += ["## Summary", "", _md_table(*summary_table(report["runs"])), ""]
    lines += ["## By variant and learning rate", "", "Mean ± sample std over the runs (seeds) of each variant and LR.", ""]  # fmt: skip
    lines += [_md_table(*variant_table(report["variants"])), ""]
    lines += ["## Diverged runs", ""]
    div = [r for r in report["runs"] if r["status"] == "diverged"]
    lines += [f"- `{r['run']}`: {r['message'] or 'diverged'}" for r in div] or ["None."]
    lines.append("")
    for kind, title, text in _SECTIONS:
        figs = [f for f in report["figures"] if f["kind"] == kind]
        if not figs:
            continue
        lines += [f"## {title}", "", text, ""]
        for f in figs:
            lines += [f"### {f['group']}", "", f"![{kind}, {f['group']}]({f['file']})", ""]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    lines += ["---", "", "Data: [summary.csv](summary.csv), [report.json](report.json).", ""]
    return "\n".join(lines)


def render_html(report: dict[str, Any]) -> str:
    """``index.html``: the same page as ``index.md``, self-contained apart from the PNGs."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>Training report</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:2px 6px}"
        "th{background:#f0f0f0}img{max-width:100%}</style></head><body>",
        "<h1>Training report</h1>",
    ]
    parts += [f"<p>{e(line).replace('`', '')}</p>" for line in _header_lines(report)]
    parts += ["<h2>Summary</h2>", _html_table(*summary_table(report["runs"]))]
    parts += ["<h2>By variant and learning rate</h2>", "<p>Mean ± sample std over the runs (seeds) of each variant and LR.</p>"]  # fmt: skip
    parts.append(_html_table(*variant_table(report["variants"])))
    parts.append("<h2>Diverged runs</h2>")
    div = [r for r in report["runs"] if r["status"] == "diverged"]
    items = "".join(
        f"<li><code>{e(r['run'])}</code>: {e(r['message'] or 'diverged')}</li>" for r in div
    )
    parts.append(f"<ul>{items}</ul>" if div else "<p>None.</p>")
    for kind, title, text in _SECTIONS:
        figs = [f for f in report["figures"] if f["kind"] == kind]
        if not figs:
            continue
        parts += [f"<h2>{e(title)}</h2>", f"<p>{e(text)}</p>"]
        for f in figs:
            parts += [f"<h3>{e(f['group'])}</h3>", f"<a href='{e(f['file'])}'><img src='{e(f['file'])}' alt='{e(kind)}'></a>"]  # fmt: skip
    if report["warnings"]:
        parts += (
            ["<h2>Warnings</h2><ul>"] + [f"<li>{e(w)}</li>" for w in report["warnings"]] + ["</ul>"]
        )
    parts.append(
        "<hr><p>Data: <a href='summary.csv'>summary.csv</a>, <a href='report.json'>report.json</a>.</p>"
    )
    parts.append("</body></html>\n")
    return "\n".join(parts)

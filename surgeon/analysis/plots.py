"""PNG figures of the learned values: against depth, over epochs, and their histograms.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no global backend
switch), so plotting works headless and does not disturb an interactive session.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any

from .targets import PARAMS, Target

IDENTITY = {"shift": 0.0, "scale": 1.0}
MAX_HIST_SITES = 36
MAX_BAND_SITES = 6  # more std bands in one panel are unreadable
DPI = 110
X_LABEL_INCHES = 0.3  # room for an x-axis label below rotated tick labels
SITE_AXIS = "site, by depth (input first)"


def figure(
    nrows: int = 1,
    ncols: int = 1,
    size: tuple[float, float] = (7.0, 4.0),
    layout: str | None = None,
):
    """A figure on an Agg canvas and its axes (always a flat list). By default no layout
    engine runs (they cost about a second per figure): callers place the axes with
    ``subplots_adjust``, sizing margins from the tick-label lengths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def plain_text(plot):
    """Decorator: ``plot`` draws with mathtext off, so a name from a run folder (``$x$``,
    ``$\\bad{$``) is shown as written, never parsed (a parse error would stop the report)."""

    @functools.wraps(plot)
    def plot_plain(*args, **kwargs):
        from matplotlib import rc_context

        with rc_context({"text.parse_math": False}):
            return plot(*args, **kwargs)

    return plot_plain


def save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def missing_labels(fig) -> list[str]:
    """What a reader of ``fig`` would miss: a title (the figure's or a panel's) and, on every
    panel, a y label (its own or the figure's) and an x label (its own, that of a panel below
    it in the same column, or the figure's). Empty when nothing is missing."""

    def fig_text(kind: str) -> str:  # fig.get_suptitle() etc. from matplotlib 3.8 on
        text = getattr(fig, f"_{kind}", None)
        return text.get_text() if text is not None else ""

    panels = [ax for ax in fig.axes if ax.axison and ax.get_subplotspec() is not None]
    out = []
    if not fig_text("suptitle") and not any(ax.get_title() for ax in panels):
        out.append("no title")
    for ax in panels:
        spec = ax.get_subplotspec()
        name = ax.get_title() or f"panel (row {spec.rowspan.start}, col {spec.colspan.start})"
        if not ax.get_ylabel() and not fig_text("supylabel"):
            out.append(f"{name}: no y-axis label")
        below = [
            o for o in panels
            if o.get_subplotspec().colspan == spec.colspan
            and o.get_subplotspec().rowspan.start >= spec.rowspan.start
        ]  # fmt: skip
        if not any(o.get_xlabel() for o in below) and not fig_text("supxlabel"):
            out.append(f"{name}: no x-axis label")
    return out


def slug(text: str) -> str:
    """A file-name-safe version of ``text``."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_") or "x"


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def label_inches(names: list[str], fontsize: float = 7) -> float:
    """Height taken by ``names`` as x tick labels rotated by 60 degrees, in inches."""
    longest = max((len(n) for n in names), default=1)
    return 0.8 * longest * fontsize * 0.6 / 72 + 0.35


def _site_ticks(ax, names: list[str], show: bool = True) -> None:
    ax.set_xticks(range(len(names)))
    if not show:
        ax.set_xticklabels([])
    elif len(names) <= 40:
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    else:
        ax.set_xticklabels([n if i % max(1, len(names) // 20) == 0 else "" for i, n in enumerate(names)], rotation=60, ha="right", fontsize=6)  # fmt: skip


def per_target(result: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """``[(label, [site stats...])]`` from an ``inspect`` result (one or several targets)."""
    labels = [t["label"] for t in result["targets"]]
    if len(labels) == 1:
        return [(labels[0], result["sites"])]
    return [
        (label, [s["per_target"][i] for s in result["sites"]]) for i, label in enumerate(labels)
    ]


@plain_text
def plot_depth(result: dict[str, Any], path: Path) -> Path:
    """Mean of each site's shift and scale against depth (min-max band), one line per target."""
    names = [s["name"] for s in result["sites"]]
    width = max(6.0, min(20.0, 0.35 * len(names) + 3))
    bottom = label_inches(names) + X_LABEL_INCHES
    height = 5.8 + bottom
    fig, axes = figure(2, 1, (width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.2 / width, top=1 - 0.4 / height, bottom=bottom / height, hspace=0.12)  # fmt: skip
    series = per_target(result)
    palette = colors(len(series))
    x = list(range(len(names)))
    for ax, name in zip(axes, PARAMS):
        drawn = False
        for (label, sites), color in zip(series, palette):
            if all(s[name] is None for s in sites):
                continue
            mean = [_f(s[name], "mean") for s in sites]
            lo = [_f(s[name], "min") for s in sites]
            hi = [_f(s[name], "max") for s in sites]
            ax.plot(x, mean, "o-", color=color, label=label, markersize=4)
            ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
            drawn = True
        ax.axhline(IDENTITY[name], color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(name)
        if not drawn:
            ax.text(
                0.5, 0.5, f"no {name} parameters", ha="center", va="center", transform=ax.transAxes
            )
        _site_ticks(ax, names, show=ax is axes[-1])  # both panels show the same sites
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel(SITE_AXIS)
    axes[0].set_title("learned values by depth (line: mean, band: min to max)")
    if len(series) > 1 or series[0][0]:
        axes[0].legend(fontsize=8)
    return save(fig, path)


def _f(stats: dict[str, Any] | None, key: str) -> float:
    if stats is None or stats.get(key) is None:
        return math.nan
    return float(stats[key])


@plain_text
def plot_trajectory(traj: dict[str, Any], path: Path) -> Path:
    """Each site's mean shift and scale over epochs, coloured by depth."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    sites, epochs = traj["sites"], traj["epochs"]
    fig, axes = figure(2, 1, (7.5, 6.5))
    fig.subplots_adjust(left=0.11, right=0.97, top=0.94, bottom=0.08, hspace=0.15)
    cmap = colormaps["viridis"]
    norm = Normalize(0, max(len(sites) - 1, 1))
    band = len(sites) <= MAX_BAND_SITES
    for ax, name in zip(axes, PARAMS):
        for s in sites:
            if s[name] is None:
                continue
            color = cmap(norm(s["depth"]))
            mean = [math.nan if v is None else v for v in s[name]["mean"]]
            ax.plot(epochs, mean, "-", color=color, marker="." if len(epochs) < 30 else None, label=s["name"])  # fmt: skip
            std = [math.nan if v is None else v for v in s[name]["std"]]
            if band and any(v > 0 for v in std):  # element/channel mode: mean ± std
                lo = [m - d for m, d in zip(mean, std)]
                hi = [m + d for m, d in zip(mean, std)]
                ax.fill_between(epochs, lo, hi, color=color, alpha=0.1, linewidth=0)
        ax.axhline(IDENTITY[name], color="grey", linestyle="--", linewidth=0.8)
        ax.set_ylabel(f"{name} (mean)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if epochs:
            ax.set_xlim(min(epochs) - 0.2, max(epochs) + 0.2)
        ax.grid(alpha=0.3)
        if all(s[name] is None for s in sites):
            ax.text(
                0.5, 0.5, f"no {name} parameters", ha="center", va="center", transform=ax.transAxes
            )
    axes[1].set_xlabel("epoch (0 = init)")
    axes[0].set_title(
        f"{traj['target']}: shift/scale over training" + (" (band: mean ± std)" if band else "")
    )
    if len(sites) <= 12:
        axes[0].legend(fontsize=7, ncol=2)
    else:
        fig.colorbar(ScalarMappable(norm, cmap), ax=axes, label="site depth")
    return save(fig, path)


@plain_text
def plot_histograms(target: Target, folder: Path) -> list[Path]:
    """One figure per element/channel-mode parameter: a histogram per site."""
    out = []
    for name in PARAMS:
        if target.modes[name] not in ("element", "channel"):
            continue
        sites = [s for s in target.sites if target.param(s, name) is not None]
        if len(sites) > MAX_HIST_SITES:
            step = (len(sites) - 1) / (MAX_HIST_SITES - 1)
            sites = [sites[round(i * step)] for i in range(MAX_HIST_SITES)]
        if not sites:
            continue
        ncols = min(6, len(sites))
        nrows = math.ceil(len(sites) / ncols)
        size = (2.4 * ncols + 0.8, 2.0 * nrows + 1.1)
        fig, axes = figure(nrows, ncols, size)
        fig.subplots_adjust(left=0.65 / size[0], right=1 - 0.15 / size[0], top=1 - 0.6 / size[1], bottom=0.65 / size[1], wspace=0.35, hspace=0.55)  # fmt: skip
        for ax, site in zip(axes, sites):
            values = target.param(site, name).double().flatten()
            values = values[values.isfinite()].numpy()
            bins = max(5, min(50, int(math.sqrt(max(values.size, 1))) * 2))
            ax.hist(values, bins=bins, color="tab:blue" if name == "scale" else "tab:orange")
            ax.axvline(IDENTITY[name], color="grey", linestyle="--", linewidth=0.8)
            ax.set_title(site["name"], fontsize=7)
            ax.tick_params(labelsize=6)
        for ax in axes[len(sites) :]:
            ax.set_axis_off()
        fig.suptitle(
            f"{target.label}: {name} per {target.modes[name]} (dashed: identity)", fontsize=9
        )
        fig.supxlabel(f"{name} value", fontsize=8, y=0.08 / size[1], va="bottom")
        fig.supylabel(f"{target.modes[name]}s per bin", fontsize=8, x=0.08 / size[0], ha="left")
        out.append(save(fig, Path(folder) / f"hist_{slug(target.label)}_{name}.png"))
    return out


def plot_inspect(result: dict[str, Any], targets: list[Target], folder: Path) -> list[Path]:
    """All ``inspect-params --plot`` figures: depth, trajectories, histograms."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = [plot_depth(result, folder / "depth.png")]
    for traj in result.get("trajectories", []):
        files.append(plot_trajectory(traj, folder / f"trajectory_{slug(traj['target'])}.png"))
    for t in targets:
        files += plot_histograms(t, folder)
    return files

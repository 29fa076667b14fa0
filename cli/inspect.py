"""``surgeon inspect-params``: what the shift/scale layers of runs and saved models learned."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from .common import console, err_console

MAX_EPOCH_COLUMNS = 8


def inspect_params_command(
    targets: Annotated[
        list[Path],
        typer.Argument(
            help="run folders, saved model folders, checkpoints or snapshot .safetensors files",
            metavar="TARGET",
            show_default=False,
        ),
    ],
    epochs: Annotated[
        bool,
        typer.Option("--epochs", help="trajectories over training from RUN/snapshots/"),
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="print one JSON object on stdout instead of tables"),
    ] = False,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="write PNGs (values by depth, trajectories, histograms) into this folder",
            metavar="DIR",
        ),
    ] = None,
) -> None:
    """Per-site statistics of the learned shift/scale values, compared across TARGETs.

    Several TARGETs are compared site by site: values, differences, correlation, spread
    across seeds."""
    from surgeon import analysis

    loaded = analysis.load_targets(targets)
    result = analysis.inspect(loaded, epochs=epochs)
    if plot is not None:
        result["plots"] = [str(p) for p in analysis.plot_inspect(result, loaded, plot)]
    if as_json:
        print(json.dumps(analysis.jsonable(result), allow_nan=False))
        return
    for w in result.get("warnings", []):
        err_console.print(f"[yellow]warning:[/] {escape(w)}")
    if len(loaded) == 1:
        _print_sites(result["targets"][0], result["sites"])
    else:
        for i, t in enumerate(result["targets"]):
            _print_sites(t, [{**s, **s["per_target"][i]} for s in result["sites"]])
        _print_comparison(result["comparison"])
    for traj in result.get("trajectories", []):
        _print_trajectory(traj)
    if plot is not None:
        console.print(f"wrote {len(result['plots'])} PNGs to [bold]{plot}[/]:")
        for p in result["plots"]:
            console.print(f"  {p}")


def _g(x: Any, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def _param(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return "-"
    if stats.get("value") is not None:
        return _g(stats["value"])
    return f"{_g(stats['mean'])} ± {_g(stats['std'], 3)} [{_g(stats['min'], 3)}, {_g(stats['max'], 3)}]"


def _affine(aff: dict[str, Any]) -> str:
    a, b = aff["a"], aff["b"]
    if a["numel"] == 1 and b["numel"] == 1:
        return aff["text"]
    return f"a∈[{_g(a['min'], 3)}, {_g(a['max'], 3)}] b∈[{_g(b['min'], 3)}, {_g(b['max'], 3)}]"


def _row(table: Table, *cells: str, **kwargs: Any) -> None:
    table.add_row(*(escape(c) for c in cells), **kwargs)


def _print_sites(target: dict[str, Any], sites: list[dict[str, Any]]) -> None:
    title = (
        f"{target['label']} ({target['kind']}): {target['model']}, {target['variant']}"
        + (f", lr {target['lr']:g}" if target.get("lr") is not None else "")
        + (f", seed {target['seed']}" if target.get("seed") is not None else "")
    )
    table = Table(title=escape(title), title_justify="left")
    for col, justify in (("#", "right"), ("site", "left"), ("kind", "left"), ("shape", "left"),
                         ("shift: mean ± std [min, max]", "left"), ("scale: mean ± std [min, max]", "left"),
                         ("scale < 0", "right"), ("effective map", "left")):  # fmt: skip
        table.add_column(escape(col), justify=justify)
    for s in sites:
        scale = s.get("scale")
        neg = "-" if scale is None else f"{100 * scale['frac_negative']:.1f}%"
        _row(
            table,
            str(s["depth"]),
            s["name"],
            s["kind"],
            "×".join("N" if d < 0 else str(d) for d in s["shape"]),
            _param(s.get("shift")),
            _param(scale),
            neg,
            _affine(s["affine"]),
        )
    console.print(table)


def _print_comparison(comp: dict[str, Any]) -> None:
    pairs = Table(
        title="pairs: r = correlation across sites of the per-site means; r within sites = mean element-wise correlation per site",
        title_justify="left",
    )
    for col in ("a", "b", "same seed", "shift r", "scale r", "shift r within sites",
                "scale r within sites", "max |Δshift|", "max |Δscale|"):  # fmt: skip
        pairs.add_column(col, justify="left" if col in ("a", "b") else "right")
    for p in comp["pairs"]:
        sh, sc = p["shift"] or {}, p["scale"] or {}
        same = {True: "yes", False: "no", None: "?"}[p["same_seed"]]
        _row(
            pairs,
            p["a"], p["b"], same,
            _g(sh.get("correlation")), _g(sc.get("correlation")),
            _g(sh.get("elementwise_correlation")), _g(sc.get("elementwise_correlation")),
            _g(sh.get("max_abs_diff"), 3), _g(sc.get("max_abs_diff"), 3),
        )  # fmt: skip
    console.print(pairs)
    sites = Table(
        title=escape(
            f"sites: per-target means, spread (sample std across targets); Δ vs {comp['reference']}"
        ),
        title_justify="left",
    )
    for col in (
        "#",
        "site",
        "shift means",
        "shift spread",
        "scale means",
        "scale spread",
        "max |Δscale|",
    ):
        sites.add_column(
            col, justify="left" if col in ("site", "shift means", "scale means") else "right"
        )
    for s in comp["sites"]:
        sh, sc = s["shift"] or {}, s["scale"] or {}
        _row(
            sites,
            str(s["depth"]),
            s["name"],
            " ".join(_g(v, 3) for v in sh.get("values", [])) or "-",
            _g(sh.get("spread"), 3),
            " ".join(_g(v, 3) for v in sc.get("values", [])) or "-",
            _g(sc.get("spread"), 3),
            _g(sc.get("max_abs_diff"), 3),
        )
    console.print(sites)
    for name in ("shift", "scale"):
        summ = comp["summary"][name]
        console.print(
            f"{name}: mean r same seed {_g(summ['mean_correlation_same_seed'], 3)}, "
            f"different seeds {_g(summ['mean_correlation_different_seed'], 3)} (same variant); "
            f"mean spread {_g(summ['mean_spread'], 3)}"
        )


def _print_trajectory(traj: dict[str, Any]) -> None:
    epochs = traj["epochs"]
    if len(epochs) > MAX_EPOCH_COLUMNS:  # evenly spaced, first and last included
        step = (len(epochs) - 1) / (MAX_EPOCH_COLUMNS - 1)
        cols = sorted({round(i * step) for i in range(MAX_EPOCH_COLUMNS)})
    else:
        cols = list(range(len(epochs)))
    table = Table(
        title=escape(f"{traj['target']}: mean over epochs (shift / scale)"), title_justify="left"
    )
    table.add_column("site")
    for i in cols:
        table.add_column(f"ep {epochs[i]}", justify="right")
    for s in traj["sites"]:
        cells = []
        for i in cols:
            parts = [_g(s[p]["mean"][i], 3) for p in ("shift", "scale") if s[p] is not None]
            cells.append(" / ".join(parts))
        _row(table, s["name"], *cells)
    console.print(table)


__all__ = ["inspect_params_command"]

"""The tables of docs/reproduction.md, from the committed report.json files.

    python docs/results/science/tables.py

Every cell is mean ± sample std over the seeds (n) of the test error at the epoch chosen on
the validation hold-out, as `surgeon report` computed it; (best) and (≈) as in its table.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def pct(m, s, digits=1):
    if m is None:
        return "-"
    return f"{100 * m:.{digits}f}" + (f" ± {100 * s:.{digits}f}" if s is not None else "")


def fmt(key, m, s):
    if key.endswith(("_err", "err_at_best")):
        return pct(m, s)
    return "-" if m is None else f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else "")


def cells(recipe: str) -> list[dict]:
    return json.loads((HERE / recipe / "report.json").read_text())["variants"]


def grid(recipe: str, key: str = "test_err_at_best") -> str:
    agg = cells(recipe)
    lrs = sorted({a["lr"] for a in agg})
    rows = {}
    for a in agg:
        label = a["variant"] + (f" [{a['tag']}]" if a["tag"] else "")
        mark = " (best)" if a.get("best_in_group") and key == "test_err_at_best" else ""
        mark = mark or (" (≈)" if a.get("within_spread") and key == "test_err_at_best" else "")
        div = f", {a['diverged']} div." if a["diverged"] else ""
        rows.setdefault(label, {})[a["lr"]] = (
            fmt(key, a[f"{key}_mean"], a[f"{key}_std"]) + mark + f" (n={a[f'{key}_n']}{div})"
        )
    out = ["| variant | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |"]
    out.append("|---|" + "---:|" * len(lrs))
    for label, by_lr in rows.items():
        out.append(f"| {label} | " + " | ".join(by_lr.get(lr, "-") for lr in lrs) + " |")
    return "\n".join(out)


def numbers(recipe: str, keys: tuple[str, ...]) -> str:
    out = ["| variant | case | lr | n | " + " | ".join(keys) + " |"]
    out.append("|---|---|---:|---:|" + "---:|" * len(keys))
    for a in cells(recipe):
        vals = []
        for k in keys:
            m, s = a[f"{k}_mean"], a[f"{k}_std"]
            if k.endswith(("_err", "err_at_best")):
                vals.append(pct(m, s))
            else:
                vals.append("-" if m is None else f"{m:.3f}" + (f" ± {s:.3f}" if s else ""))
        out.append(
            f"| {a['variant']} | {a['tag'] or '-'} | {a['lr']:g} | {a['runs']} | "
            + " | ".join(vals)
            + " |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    for recipe in ("repro-cpu-mlp", "repro-cpu-mlp-dropout"):
        if (HERE / recipe / "report.json").is_file():
            for key in ("test_err_at_best", "final_test_err", "final_train_err", "final_ema_loss"):
                print(f"\n### {recipe}: {key}\n\n{grid(recipe, key)}")
    for recipe in ("q-collapse-mlp", "q-ablation-mlp"):
        if (HERE / recipe / "report.json").is_file():
            print(
                f"\n### {recipe}\n\n"
                + numbers(
                    recipe,
                    ("test_err_at_best", "final_test_err", "final_train_err", "final_ema_loss"),
                )
            )
    if (HERE / "q-sawtooth-mlp" / "report.json").is_file():
        print(
            "\n### q-sawtooth-mlp\n\n"
            + numbers(
                "q-sawtooth-mlp", ("boundary_rise", "mid_rise", "sawtooth", "test_err_at_best")
            )
        )


def trajectories(prefix: str, epochs: tuple[int, ...] = (0, 1, 2, 8), variant: str = "") -> str:
    """Layer-wise scale and shift per site after the given epochs: mean ± std over seeds,
    per case tag (from snapshots.json)."""
    snaps = json.loads((HERE / "snapshots.json").read_text())
    by_case: dict[str, dict[str, list[list[float]]]] = {}
    for key, run in snaps.items():
        if key == "throughput" or not key.startswith(prefix + "/"):
            continue
        c = run["config"]
        if variant and c["variant"] != variant:
            continue
        case = by_case.setdefault(f"{c['tag'] or c['variant']}, lr {c['lr']:g}", {})
        for param, values in run["values"].items():
            case.setdefault(param, []).append(values)
    out = ["| case | parameter | " + " | ".join(f"epoch {e}" for e in epochs) + " |"]
    out.append("|---|---|" + "---:|" * len(epochs))
    for case, params in by_case.items():
        for param, runs in sorted(params.items()):
            cells = []
            for e in epochs:
                vals = [r[e] for r in runs if len(r) > e]
                if not vals:  # every run diverged before this epoch
                    cells.append("-")
                    continue
                m = sum(vals) / len(vals)
                s = (
                    (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
                    if len(vals) > 1
                    else None
                )
                cells.append(f"{m:.3f}" + (f" ± {s:.3f}" if s is not None else ""))
            out.append(f"| {case} | {param} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__" and (HERE / "snapshots.json").is_file():
    for prefix in ("q-collapse-mlp", "q-ablation-mlp"):
        print(f"\n### {prefix}: shift/scale values (snapshots)\n\n{trajectories(prefix)}")
    for prefix in ("repro-cpu-mlp", "repro-cpu-mlp-dropout"):
        table = trajectories(prefix, variant="shift-layer+scale-layer")
        print(f"\n### {prefix}: layer-wise shift+scale values (snapshots)\n\n{table}")


def similarity(prefix: str, variant: str = "shift-layer+scale-layer", epoch: int = -1) -> str:
    """How alike the learned values of two runs are, over every site's shift and scale at
    ``epoch`` (default: the last) of the runs that finished (no divergence): for pairs of runs that differ only in seed (same LR, same
    case) and pairs that differ only in LR (same seed, same case), the mean absolute
    difference over all values and their Pearson correlation; mean ± std over the pairs."""
    import itertools
    import statistics

    snaps = json.loads((HERE / "snapshots.json").read_text())
    runs = []
    for key, run in snaps.items():
        if key == "throughput" or not key.startswith(prefix + "/"):
            continue
        c = run["config"]
        if c["variant"] != variant or not run["values"]:
            continue
        params = sorted(run["values"])
        runs.append((c, params, [run["values"][p] for p in params]))
    full = max((len(v[0]) for _, _, v in runs), default=0)  # runs that diverged stop early
    runs = [(c, p, [x[epoch] for x in v]) for c, p, v in runs if len(v[0]) == full]

    def pearson(a: list[float], b: list[float]) -> float | None:
        ma, mb = statistics.fmean(a), statistics.fmean(b)
        va = sum((x - ma) ** 2 for x in a) ** 0.5
        vb = sum((y - mb) ** 2 for y in b) ** 0.5
        return (
            None
            if va == 0 or vb == 0
            else sum((x - ma) * (y - mb) for x, y in zip(a, b)) / (va * vb)
        )

    groups: dict[str, list[tuple[float, float | None]]] = {"seed": [], "lr": [], "case": []}
    for (c1, p1, v1), (c2, p2, v2) in itertools.combinations(runs, 2):
        same = {k for k in ("seed", "lr", "tag") if c1[k] == c2[k]}
        if p1 != p2 or len(same) != 2:
            continue
        kind = {"seed", "lr", "tag"}.difference(same).pop()
        kind = "case" if kind == "tag" else kind
        mad = statistics.fmean(abs(x - y) for x, y in zip(v1, v2))
        groups[kind].append((mad, pearson(v1, v2)))

    def ms(vals: list[float]) -> str:
        if not vals:
            return "-"
        s = statistics.stdev(vals) if len(vals) > 1 else None
        return f"{statistics.fmean(vals):.3f}" + (f" ± {s:.3f}" if s is not None else "")

    n_values = len(runs[0][1]) if runs else 0
    out = [
        f"| pairs that differ in | pairs | mean \\|difference\\| over {n_values} values | correlation |"
    ]
    out.append("|---|---:|---:|---:|")
    labels = (("seed", "seed only"), ("lr", "LR only"), ("case", "case only (e.g. multiplier)"))
    for kind, label in labels:
        pairs = groups[kind]
        if not pairs and kind == "case":
            continue
        corr = [r for _, r in pairs if r is not None]
        out.append(f"| {label} | {len(pairs)} | {ms([m for m, _ in pairs])} | {ms(corr)} |")
    return "\n".join(out)


if __name__ == "__main__" and (HERE / "snapshots.json").is_file():
    for prefix in ("repro-cpu-mlp", "repro-cpu-mlp-dropout", "repro-cpu-allconv"):
        print(
            f"\n### {prefix}: similarity of the learned values across runs\n\n{similarity(prefix)}"
        )


def step_sizes(prefix: str, epochs: tuple[int, ...] = (1, 8)) -> str:
    """The effective step size of the weight layer after each site (mean |dW|/|W| per
    optimiser step over the epoch, from the probes): mean over seeds per variant and case,
    one column per site, one row per epoch (from snapshots.json's "steps")."""
    snaps = json.loads((HERE / "snapshots.json").read_text())
    cells: dict[tuple[str, int], dict[str, list[float]]] = {}
    sites: list[str] = []
    for key, run in snaps.items():
        if key == "throughput" or not key.startswith(prefix + "/") or "steps" not in run:
            continue
        c = run["config"]
        label = c["variant"] + (f" [{c['tag']}]" if c["tag"] and c["tag"] != "base" else "")
        for site, values in run["steps"].items():
            if site not in sites:
                sites.append(site)
            for e in epochs:
                if e < len(values) and values[e] is not None:
                    cells.setdefault((label, e), {}).setdefault(site, []).append(values[e])
    out = ["| variant | epoch | " + " | ".join(sites) + " |"]
    out.append("|---|---:|" + "---:|" * len(sites))
    for (label, e), by_site in sorted(cells.items()):
        vals = [by_site.get(s) for s in sites]
        out.append(
            f"| {label} | {e} | "
            + " | ".join("-" if not v else f"{sum(v) / len(v):.4f}" for v in vals)
            + " |"
        )
    return "\n".join(out)


if __name__ == "__main__" and (HERE / "snapshots.json").is_file():
    print(f"\n### repro-cpu-allconv: step sizes\n\n{step_sizes('repro-cpu-allconv')}")

"""Statistics of the learned shift/scale values: per site, over epochs, and across targets.

Conventions (the docs repeat them):

- ``std`` of one tensor is the population std (``correction=0``): the tensor is all of its
  values. ``spread`` across targets (seeds, runs) is the sample std (``correction=1``).
- A layer-mode parameter is one number: its stats carry ``value``; ``std`` is 0.
- The effective map of a site is ``y = a*x + b`` with ``a = scale`` and ``b = shift*scale``
  (:meth:`surgeon.layers.ShiftScale.effective_affine`).
- Non-finite values (a diverged run) are left out of mean/std/min/max and counted in
  ``nonfinite``; :func:`jsonable` turns any remaining NaN/inf into ``null``.
"""

from __future__ import annotations

import math
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from ..errors import AnalysisError
from ..layers import ShiftScale
from ..rundir import variant_name
from .targets import PARAMS, Target, read_params


def tensor_stats(t: torch.Tensor, *, negative: bool = False) -> dict[str, Any]:
    """``mean``, ``std`` (population), ``min``, ``max``, ``numel``; ``value`` for one
    number; ``frac_negative`` with ``negative=True``."""
    x = t.detach().double().flatten()
    finite = x[torch.isfinite(x)]
    out: dict[str, Any] = {"mean": None, "std": None, "min": None, "max": None}
    if finite.numel():
        out["mean"] = finite.mean().item()
        out["std"] = finite.std(correction=0).item() if finite.numel() > 1 else 0.0
        out["min"] = finite.min().item()
        out["max"] = finite.max().item()
    if x.numel() == 1:
        out["value"] = x[0].item()
    if negative:
        out["frac_negative"] = (x < 0).double().mean().item() if x.numel() else None
    out["numel"] = x.numel()
    if finite.numel() != x.numel():
        out["nonfinite"] = x.numel() - finite.numel()
    return out


def _num(x: float | None, digits: int = 4) -> str:
    return "nan" if x is None else f"{x:.{digits}g}"


def effective_affine(
    site: dict[str, Any],
    shift: torch.Tensor | None,
    scale: torch.Tensor | None,
    modes: dict[str, str],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, b)`` of ``y = a*x + b`` at ``site``, as the layer computes it."""
    feature_shape = [int(s) for s in site["shape"][1:]]
    try:
        m = ShiftScale(
            modes["shift"] if shift is not None else "none",
            modes["scale"] if scale is not None else "none",
            feature_shape,
            int(site.get("channel_dim", 1)),
        )
        with torch.no_grad():
            for name, value in (("shift", shift), ("scale", scale)):
                if value is not None:
                    getattr(m, name).copy_(value)
        return m.effective_affine()
    except Exception:  # a shape the record does not explain: plain broadcasting
        a = scale if scale is not None else torch.ones(())
        b = shift * a if shift is not None else torch.zeros(())
        return a.clone(), b.clone()


def affine_summary(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    """Stats of ``a`` and ``b`` and a one-line formula."""
    sa, sb = tensor_stats(a, negative=True), tensor_stats(b)
    if a.numel() == 1 and b.numel() == 1:
        bv = b.item()
        sign = "-" if bv < 0 else "+"
        text = f"y = {_num(a.item())}*x {sign} {_num(abs(bv))}"
    else:
        text = (
            f"y = a*x + b, a in [{_num(sa['min'], 3)}, {_num(sa['max'], 3)}] (mean {_num(sa['mean'], 3)}),"
            f" b in [{_num(sb['min'], 3)}, {_num(sb['max'], 3)}] (mean {_num(sb['mean'], 3)})"
        )
    return {"a": sa, "b": sb, "text": text}


def site_stats(target: Target, site: dict[str, Any]) -> dict[str, Any]:
    """``{"mode", "shift", "scale", "affine"}`` of one site of one target."""
    modes = target.modes
    out: dict[str, Any] = {"mode": variant_name("none", modes["shift"], modes["scale"])}
    tensors = {}
    for name in PARAMS:
        t = target.param(site, name)
        tensors[name] = t
        if t is None:
            out[name] = None
        else:
            out[name] = {"mode": modes[name], **tensor_stats(t, negative=name == "scale")}
    out["affine"] = affine_summary(
        *effective_affine(site, tensors["shift"], tensors["scale"], modes)
    )
    return out


def _site_meta(site: dict[str, Any]) -> dict[str, Any]:
    keys = ("index", "name", "kind", "target", "shape", "channel_dim", "module")
    return {k: site.get(k) for k in keys}


def describe_sites(targets: list[Target]) -> list[dict[str, Any]]:
    """The ``sites`` list of the JSON object.

    With one target each site carries that target's stats. With several, ``shift`` and
    ``scale`` are the stats of all targets' values pooled, and ``per_target`` lists each.
    """
    out = []
    for j, site in enumerate(targets[0].sites):
        entry = {**_site_meta(site), "depth": j}
        if len(targets) == 1:
            entry.update(site_stats(targets[0], site))
            out.append(entry)
            continue
        per = [{"target": t.label, **site_stats(t, t.sites[j])} for t in targets]
        modes = {p["mode"] for p in per}
        entry["mode"] = modes.pop() if len(modes) == 1 else "mixed"
        for name in PARAMS:
            values = [t.param(t.sites[j], name) for t in targets]
            values = [v.flatten() for v in values if v is not None]
            entry[name] = (
                tensor_stats(torch.cat(values), negative=name == "scale") if values else None
            )
        affines = [
            effective_affine(
                t.sites[j], t.param(t.sites[j], "shift"), t.param(t.sites[j], "scale"), t.modes
            )
            for t in targets
        ]
        entry["affine"] = affine_summary(
            torch.cat([a.flatten() for a, _ in affines]),
            torch.cat([b.flatten() for _, b in affines]),
        )
        entry["per_target"] = per
        out.append(entry)
    return out


def check_compatible(targets: list[Target]) -> None:
    """Raise unless all targets have the same model and the same site list."""
    ref = targets[0]
    ref_sites = [(s["name"], s["kind"], list(s["shape"])) for s in ref.sites]
    for t in targets[1:]:
        if t.model_id != ref.model_id:
            raise AnalysisError(
                f"cannot compare {ref.label} and {t.label}: different models "
                f"({_model_text(ref)} vs {_model_text(t)})",
                hint="compare runs of the same model and model arguments",
            )
        sites = [(s["name"], s["kind"], list(s["shape"])) for s in t.sites]
        if sites != ref_sites:
            diff = next(
                (
                    f"site {i}: {a[0]} vs {b[0]}"
                    for i, (a, b) in enumerate(zip(ref_sites, sites))
                    if a != b
                ),
                f"{len(ref_sites)} vs {len(sites)} sites",
            )
            raise AnalysisError(
                f"cannot compare {ref.label} and {t.label}: different site lists ({diff})",
                hint="compare runs made with the same include/exclude and input size",
            )


def _model_text(t: Target) -> str:
    args = (t.record.get("source") or {}).get("args") or {}
    return t.model_spec + (f" {args}" if args else "")


def pearson(x: list[float] | torch.Tensor, y: list[float] | torch.Tensor) -> float | None:
    """Pearson correlation of two equally long sequences; ``None`` when undefined
    (fewer than two finite pairs, or one side constant)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if x.numel() < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt((dx * dx).sum().item()) * math.sqrt((dy * dy).sum().item())
    if den == 0.0:
        return None
    if torch.equal(x, y):
        return 1.0
    return max(-1.0, min(1.0, (dx * dy).sum().item() / den))


def _mean(t: torch.Tensor | None) -> float | None:
    if t is None:
        return None
    x = t.detach().double().flatten()
    x = x[torch.isfinite(x)]
    return x.mean().item() if x.numel() else None


def _sample_std(values: list[float]) -> float | None:
    if len(values) < 2:
        return None
    return torch.tensor(values, dtype=torch.float64).std(correction=1).item()


def _avg(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def compare(targets: list[Target]) -> dict[str, Any]:
    """Site-by-site comparison of several targets (the ``comparison`` object).

    - ``sites``: per site and parameter, each target's mean (``values``; for layer mode
      the value), its difference from the first target (``diff``), the sample std across
      targets (``spread``); when all shapes agree, the largest element-wise |difference|
      from the first target, the mean element-wise std across targets, and each target's
      element-wise correlation with the first (``correlation_with_reference``; channel
      and element modes only).
    - ``pairs``: per pair of targets, the Pearson correlation across sites of the per-site
      means (``correlation``), the mean over sites of the within-site element-wise
      correlation (``elementwise_correlation``; channel and element modes), and the mean
      and max |difference|.
    - ``summary``: mean correlation over pairs of the same variant, split into same seed
      and different seeds, and the mean spread across sites.
    """
    check_compatible(targets)
    n = len(targets)
    site_rows = []
    for j, site in enumerate(targets[0].sites):
        row: dict[str, Any] = {"name": site["name"], "index": site.get("index"), "depth": j}
        for name in PARAMS:
            tens = [t.param(t.sites[j], name) for t in targets]
            if all(x is None for x in tens):
                row[name] = None
                continue
            means = [_mean(x) for x in tens]
            ref = means[0]
            entry: dict[str, Any] = {
                "values": means,
                "diff": [None if m is None or ref is None else m - ref for m in means],
                "spread": _sample_std([m for m in means if m is not None]),
                "max_abs_diff": None,
                "elementwise_spread": None,
                "correlation_with_reference": None,
            }
            if all(x is not None for x in tens) and len({tuple(x.shape) for x in tens}) == 1:
                stacked = torch.stack([x.double() for x in tens])
                entry["max_abs_diff"] = (stacked - stacked[0]).abs().max().item()
                if n > 1:
                    entry["elementwise_spread"] = stacked.std(0, correction=1).mean().item()
                if tens[0].numel() > 1:
                    entry["correlation_with_reference"] = [pearson(x, tens[0]) for x in tens]
            row[name] = entry
        site_rows.append(row)

    pairs = []
    for ia, ib in combinations(range(n), 2):
        a, b = targets[ia], targets[ib]
        pair: dict[str, Any] = {
            "a": a.label,
            "b": b.label,
            "same_variant": a.variant == b.variant,
            "same_seed": None if a.seed is None or b.seed is None else a.seed == b.seed,
        }
        for name in PARAMS:
            ta = [a.param(s, name) for s in a.sites]
            tb = [b.param(s, name) for s in b.sites]
            both = [(x, y) for x, y in zip(ta, tb) if x is not None and y is not None]
            if not both:
                pair[name] = None
                continue
            ma, mb = [_mean(x) for x, _ in both], [_mean(y) for _, y in both]
            diffs = [abs(x - y) for x, y in zip(ma, mb) if x is not None and y is not None]
            same_shape = all(x.shape == y.shape for x, y in both)
            entry = {
                "correlation": pearson(_nan(ma), _nan(mb)),
                "elementwise_correlation": None,
                "mean_abs_diff": _avg(diffs),
                "max_abs_diff": None,
            }
            if same_shape:
                within = [pearson(x, y) for x, y in both if x.numel() > 1]
                entry["elementwise_correlation"] = _avg(within)
                fa = torch.cat([x.double().flatten() for x, _ in both])
                fb = torch.cat([y.double().flatten() for _, y in both])
                d = (fa - fb).abs()
                d = d[torch.isfinite(d)]
                entry["max_abs_diff"] = d.max().item() if d.numel() else None
            pair[name] = entry
        pairs.append(pair)

    summary: dict[str, Any] = {}
    for name in PARAMS:
        same = [
            p[name]["correlation"]
            for p in pairs
            if p[name] and p["same_variant"] and p["same_seed"]
        ]
        other = [
            p[name]["correlation"]
            for p in pairs
            if p[name] and p["same_variant"] and p["same_seed"] is False
        ]
        spreads = [r[name]["spread"] for r in site_rows if r[name]]
        summary[name] = {
            "mean_correlation_same_seed": _avg(same),
            "mean_correlation_different_seed": _avg(other),
            "mean_spread": _avg(spreads),
        }
    return {"reference": targets[0].label, "sites": site_rows, "pairs": pairs, "summary": summary}


def _nan(values: list[float | None]) -> list[float]:
    return [math.nan if v is None else v for v in values]


def trajectory(target: Target) -> dict[str, Any] | None:
    """Per-epoch stats of each site's shift and scale, from the run's snapshots.

    ``{"target", "epochs": [0, 1, ...], "sites": [{"name", "depth", "shift": {"mean": [...],
    "std": [...], "min": [...], "max": [...]}, "scale": {...}}]}``; ``None`` without
    snapshots. Epoch 0 is the initial (identity) state.
    """
    snaps = target.snapshots()
    if not snaps:
        return None
    keys = ("mean", "std", "min", "max")
    sites = []
    for j, site in enumerate(target.sites):
        entry: dict[str, Any] = {"name": site["name"], "depth": j}
        for name in PARAMS:
            entry[name] = None if target.param(site, name) is None else {k: [] for k in keys}
        sites.append(entry)
    epochs, skipped = [], []
    for epoch, file in snaps:
        try:
            params = read_params(file, target.sites)
        except AnalysisError:  # a snapshot being written, or damaged: leave it out
            skipped.append(str(file))
            continue
        epochs.append(epoch)
        for entry, site in zip(sites, target.sites):
            for name in PARAMS:
                if entry[name] is None:
                    continue
                t = params.get(f"{site['module']}.{name}")
                st = tensor_stats(t) if t is not None else dict.fromkeys(keys)
                for k in keys:
                    entry[name][k].append(st[k])
    out = {"target": target.label, "epochs": epochs, "sites": sites}
    if skipped:
        out["skipped"] = skipped
    return out


def inspect(targets: list[Target], *, epochs: bool = False) -> dict[str, Any]:
    """The JSON object of ``surgeon inspect-params``: ``{"targets", "sites"}``, plus
    ``comparison`` with several targets and ``trajectories`` with ``epochs=True``."""
    if len(targets) > 1:
        check_compatible(targets)
    out: dict[str, Any] = {
        "targets": [t.describe() for t in targets],
        "sites": describe_sites(targets),
    }
    if len(targets) > 1:
        out["comparison"] = compare(targets)
    if epochs:
        trajs = [trajectory(t) for t in targets]
        if all(tr is None for tr in trajs):
            raise AnalysisError(
                "--epochs: no per-epoch snapshots in "
                + ", ".join(str(t.run_dir or t.path) for t in targets),
                hint="trajectories come from RUN/snapshots/, which `surgeon train` writes",
            )
        out["trajectories"] = [tr for tr in trajs if tr is not None]
        warnings = [
            f"unreadable snapshot left out: {f}"
            for tr in trajs
            if tr
            for f in tr.get("skipped", [])
        ]
        missing = [t.label for t, tr in zip(targets, trajs) if tr is None]
        if missing:
            warnings.append(f"no snapshots for {', '.join(missing)}")
        if warnings:
            out["warnings"] = warnings
    return out


def mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    """Mean and sample std (n - 1) of the finite numbers in ``values``; std None for n < 2."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def within_spread(a: tuple[float, float | None], b: tuple[float, float | None]) -> bool:
    """Whether two ``(mean, std)`` cells differ by less than their spread combined,
    ``sqrt(std_a² + std_b²)``. Without a std (one seed) nothing is within: unknown spread."""
    (ma, sa), (mb, sb) = a, b
    if sa is None or sb is None:
        return False
    return abs(ma - mb) < math.sqrt(sa**2 + sb**2)


def sawtooth(losses: dict[int, float], epoch_ends: list[int]) -> dict[str, float | None]:
    """The saw-tooth of a per-step training loss, measured: the mean rise of the raw loss
    across an epoch boundary (mean of the ``k`` steps after the boundary minus the ``k``
    before, ``k`` an eighth of an epoch) and the same rise across the middle of each epoch,
    where no boundary is. A saw-tooth made by epoch boundaries shows as ``boundary_rise``
    above ``mid_rise``. ``losses`` maps the 1-based step to its loss."""
    if len(epoch_ends) < 2:
        return {"boundary_rise": None, "mid_rise": None, "sawtooth": None}
    per_epoch = epoch_ends[1] - epoch_ends[0]
    k = max(1, per_epoch // 8)

    def rise(at: int) -> float | None:
        before = [losses.get(s) for s in range(at - k + 1, at + 1)]
        after = [losses.get(s) for s in range(at + 1, at + k + 1)]
        if any(v is None or not math.isfinite(v) for v in before + after):
            return None
        return sum(after) / k - sum(before) / k

    bounds = [r for r in (rise(e) for e in epoch_ends[:-1]) if r is not None]
    mids = [r for r in (rise(e + per_epoch // 2) for e in epoch_ends[:-1]) if r is not None]
    b = sum(bounds) / len(bounds) if bounds else None
    m = sum(mids) / len(mids) if mids else None
    return {
        "boundary_rise": b,
        "mid_rise": m,
        "sawtooth": None if b is None or m is None else b - m,
    }


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN/inf as ``None``, tensors as lists and paths as strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj

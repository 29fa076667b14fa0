"""The transformers vision zoo: every `*ForImageClassification` class that builds from its
default config, swept like the timm zoo (handled, method, sites against the runtime
activation calls, identity at init, insert time).

    python benchmarks/zoo_transformers.py [--models ViT,ConvNext] [--csv FILE]

Each model is built from its default config (random weights, `num_labels=10`), in eval
mode, at the config's image size; `surgeon.insert(model, "layer", "layer")` with the
default automatic fallback. Writes benchmarks/results/zoo_transformers.csv.
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from pathlib import Path

import torch

import surgeon
from surgeon.recall import compare, count_activation_calls
from surgeon.verify import max_abs_diff_at_init

CSV = Path(__file__).parent / "results" / "zoo_transformers.csv"
# classes that are not plain image classifiers of an image tensor (text towers, wrappers)
SKIP = {
    "AutoModel", "TimmWrapper", "ShieldGemma2", "ImageGPT", "CLIP", "MetaClip2", "Siglip",
    "Siglip2",
}  # fmt: skip


def classes(only: list[str] | None) -> list[str]:
    import transformers

    names = sorted(
        n[: -len("ForImageClassification")]
        for n in dir(transformers)
        if n.endswith("ForImageClassification") and not n.startswith(("TF", "Flax"))
    )
    names = [n for n in names if n not in SKIP]
    return [n for n in names if not only or n in only]


def build(name: str):
    import transformers

    model_cls = getattr(transformers, f"{name}ForImageClassification")
    cfg = model_cls.config_class(num_labels=10)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    size = getattr(cfg, "image_size", 224)
    size = size if isinstance(size, int) else size[0]
    channels = getattr(cfg, "num_channels", 3)
    return model, (channels, size, size)


def _logits(out):
    return getattr(out, "logits", out)


def measure(name: str) -> dict:
    row: dict = {"model": f"transformers:{name}"}
    try:
        model, size = build(name)
    except Exception as exc:  # a class whose default config does not build
        row.update(status="no-build", error=f"{type(exc).__name__}: {str(exc)[:150]}")
        return row
    row["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    row["input_size"] = "x".join(map(str, size))
    x = torch.randn(2, *size)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            gm = surgeon.insert(model, "layer", "layer", input_size=size)
    except surgeon.SurgeonError as exc:
        row.update(status="error", handled=False, error=exc.message[:200])
        return row
    row["time_s"] = round(time.perf_counter() - t0, 3)
    rec = gm.surgeon_record.to_dict()
    row.update(status="ok", handled=True, method=rec.get("method", "fx"))
    row["sites"] = len(rec["sites"])
    row["fallback_reason"] = next((str(w.message)[:160] for w in caught), "")
    with torch.no_grad():
        runtime = count_activation_calls(model, x)
        cov = compare(rec, runtime)
        row["max_abs_diff"] = max_abs_diff_at_init(model, gm, (x,))
    row.update(
        runtime_calls=cov.total, recall=round(cov.recall, 4), explained=cov.explained,
        unreached="; ".join(f"{u['target']} x{u['calls']}: {u.get('reason', '')}"[:120]
                            for u in rec.get("unreached", [])),
    )  # fmt: skip
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=lambda s: s.split(","), default=None)
    ap.add_argument("--csv", type=Path, default=CSV)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in classes(args.models):
        row = measure(name)
        rows.append(row)
        print(
            f"{row['model']:50s} {row.get('status'):8s} {row.get('method', ''):6s} "
            f"sites={row.get('sites', '')} recall={row.get('recall', '')} "
            f"explained={row.get('explained', '')} diff={row.get('max_abs_diff', '')} "
            f"{row.get('time_s', '')}s {row.get('error', '')}",
            flush=True,
        )
    fields = sorted(
        {k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99
    )
    args.csv.parent.mkdir(parents=True, exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()

"""Online learning benchmark: batch size 1, one pass over a stream, prequential accuracy.

    python benchmarks/online.py                     # ~5-10 min on a shared 2-core CPU
    python benchmarks/online.py --stream 500 --parts allconv-scratch   # a quick look

Tests the thesis's claim that batch norm "cannot always be used (online learning)" while
shift/scale can. Parts (each a recipe-like folder of runs under --out):

- ``allconv-scratch``/``mlp-scratch``: from one init, plain vs batchnorm (train mode: batch-1
  statistics) vs shift/scale vs replace-norm, on the recipe ``online`` (2,000 streamed images
  of the embedded CIFAR-10 sample, SGD lr 0.003, no momentum);
- ``allconv-warm``/``mlp-warm``: a batchnorm model first trained with mini-batches (64, 3
  epochs, lr 0.04) on the 3,000 images not in the stream, then online at lr 0.0005 (about the
  same step per sample): BN left in train mode, BN frozen (eval mode, affine still learns)
  and BN replaced by shift/scale.

Writes benchmarks/results/online.json and online.png; `surgeon report OUT/PART` plots each
part (accuracy against samples seen, loss per sample).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from surgeon.train import load_recipe
from surgeon.train.online import plan, run_plan

WARM_LR = (
    0.0005  # online LR after a warm start: about the pretraining's per-sample step (0.04 / 64)
)
PARTS = {  # model, model args, warm-start epochs, online LR (None: the recipe's), variants
    "allconv-scratch": ("allconv", {"width": 0.25}, 0, None, [
        "plain", "batchnorm", "shift-layer+scale-layer", "shift-channel+scale-channel", "replace-norm",
    ]),
    "mlp-scratch": ("mlp", {}, 0, None, ["plain", "batchnorm", "shift-layer+scale-layer", "replace-norm"]),
    "allconv-warm": ("allconv", {"width": 0.25}, 3, WARM_LR, ["batchnorm", "batchnorm-frozen", "replace-norm"]),
    "mlp-warm": ("mlp", {}, 3, WARM_LR, ["batchnorm", "batchnorm-frozen", "replace-norm"]),
}  # fmt: skip
KEEP = (
    "variant", "status", "message", "samples", "online_acc", "online_acc_last_window", "test_acc",
    "test_acc_train_mode_b1", "warm_start_test_acc", "samples_per_s",
)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", type=int, default=2000, help="samples streamed per run")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts")
    ap.add_argument("--out", type=Path, default=Path("runs/online-bench"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--replot", action="store_true", help="only redraw online.png from --out")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads((args.results / "online.json").read_text())
        plot(args.out, list(saved["parts"]), args.results / "online.png")
        return
    torch.set_num_threads(args.threads)
    recipe = load_recipe("online")
    t_all = time.perf_counter()
    parts = {}
    for part in args.parts.split(","):
        model, margs, warm, lr, variants = PARTS[part]
        overrides = {"model": model, "model_args": margs, "limit_train": args.stream}
        if lr is not None:
            overrides["lr"] = lr
        runs = plan(recipe, overrides, variants=variants, warm_start=warm)
        t0 = time.perf_counter()
        results = run_plan(runs, args.out / part, recipe_name=part, warm_start=warm, log=print)
        parts[part] = {
            "model": model, "model_args": margs, "warm_start_epochs": warm, "lr": lr or recipe.base["lr"],
            "time_s": round(time.perf_counter() - t0, 1),
            "runs": [{k: r.get(k) for k in KEEP} for r in results],
        }  # fmt: skip
    cfg = recipe.base
    out = {
        "benchmark": "online", "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "stream": args.stream,
        "lr": cfg["lr"], "momentum": cfg["momentum"], "data": cfg["data"],
        "time_s": round(time.perf_counter() - t_all, 1), "parts": parts,
        "runs_folder": str(args.out),
    }  # fmt: skip
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "online.json").write_text(json.dumps(out, indent=2) + "\n")
    plot(args.out, list(parts), args.results / "online.png")
    for part, p in parts.items():
        print(f"\n{part} ({p['time_s']} s)")
        for r in p["runs"]:
            print(f"  {r['variant']:32s} {_row(r)}")
    print(f"\nwrote {args.results / 'online.json'} and {args.results / 'online.png'}")


def _row(r: dict) -> str:
    if r["status"] == "failed":
        return f"failed: {r['message']}"
    pct = lambda v: "-" if v is None else f"{100 * v:5.1f}%"  # noqa: E731
    extra = ""
    if r.get("warm_start_test_acc") is not None:
        extra += f" (test after the warm start: {pct(r['warm_start_test_acc'])})"
    if r.get("test_acc_train_mode_b1") is not None:
        extra += f" (test, train-mode batch-1 forward: {pct(r['test_acc_train_mode_b1'])})"
    return (
        f"online {pct(r['online_acc'])}  last 200 {pct(r['online_acc_last_window'])}  "
        f"test {pct(r['test_acc'])}{extra}"
    )


def plot(root: Path, parts: list[str], path: Path) -> None:
    """One panel per part: windowed prequential accuracy against samples seen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from surgeon.analysis.runs import load_runs

    cols = min(2, len(parts))
    rows = (len(parts) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(parts) :]:
        ax.set_visible(False)
    for ax, part in zip(axes.flat, parts):
        for i, r in enumerate(sorted(load_runs([root / part]), key=lambda r: r.variant)):
            color = f"C{i}"
            if not r.steps:
                ax.plot([], [], "x", color=color, label=f"{r.variant}: failed at sample 1")
                continue
            x = [s["step"] for s in r.steps]
            ax.plot(
                x, [100 * s["online_acc_window"] for s in r.steps], color=color, label=r.variant
            )
            ax.plot(x, [100 * s["online_acc"] for s in r.steps], ":", color=color)
        ax.axhline(10, color="grey", linewidth=0.7, linestyle="--")
        ax.set_ylim(0, 60)
        ax.set_title(part, fontsize=10)
        ax.set_xlabel("samples seen (batch 1)")
        ax.set_ylabel("prequential accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("online learning on the CIFAR-10 sample: window of 200 (solid), all seen (dotted), chance (dashed)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Transfer with a frozen backbone (issue 17): train a base on CIFAR-10 classes 0-4, then
move it to classes 5-9 four ways, over several seeds:

- ``probe``: linear probe, the classifier alone trains (``--train-only head``);
- ``ss-act+head``: per-channel shift/scale at the thesis's sites (input + activations)
  and the classifier (``--train-only ss,head``);
- ``ssf+head``: per-channel shift/scale after every linear/conv/norm layer (SSF's
  placement, ``--placement ssf``) and the classifier;
- ``full``: every weight fine-tunes from the base;
- ``scratch``: the reference, every weight trained from a seeded init (no base).

Each row: final test accuracy (mean +- std over seeds), trainable parameters, the optimiser's
state (SGD momentum buffers, bytes, read from ``optimizer.state``), adapter size, and the
median time of one optimiser step on this machine.

    # class halves as ImageFolder trees of symlinks (see docs/finetune.md)
    python benchmarks/transfer.py --half-a /tmp/c10/c10a --half-b /tmp/c10/c10b \\
        --model mlp --base-epochs 8 --epochs 4 --seeds 0 1 2 --name transfer_mlp

Results: ``benchmarks/results/<name>.json`` and ``.csv``, figure ``docs/results/<name>.png``.
Runs already in ``--work`` (a ``summary.json``) are read back, not retrained.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from surgeon.data import load_data
from surgeon.train import TrainConfig, Trainer

ROOT = Path(__file__).resolve().parent.parent
METHODS: dict[str, dict[str, Any]] = {
    "probe": {"train_only": "head", "shift": "none", "scale": "none"},
    "ss-act+head": {"train_only": "ss,head", "shift": "channel", "scale": "channel"},
    "ssf+head": {
        "train_only": "ss,head",
        "shift": "channel",
        "scale": "channel",
        "placement": "ssf",
    },  # fmt: skip
    "full": {"train_only": "", "shift": "none", "scale": "none"},
    # the reference: no base at all, every weight from a seeded init
    "scratch": {"train_only": "", "shift": "none", "scale": "none", "init_from": None},
}


def opt_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    )


def step_ms(run: Path) -> float:
    """Median training time per optimiser step over the epochs (metrics.jsonl)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r.get("type") == "epoch"]
    steps, per = 0, []
    for r in epochs:
        per.append(1000 * r["time_s"] / max(r["step"] - steps, 1))
        steps = r["step"]
    return statistics.median(per)


def train_one(cfg: TrainConfig, out: Path, data, base=None) -> dict[str, Any]:
    done = out / "summary.json"
    if done.is_file() and (out / "extra.json").is_file():
        return {**json.loads(done.read_text()), **json.loads((out / "extra.json").read_text())}
    if out.exists():
        import shutil

        shutil.rmtree(out)
    trainer = Trainer(cfg, out, data=data, base=base)
    t0 = time.perf_counter()
    summary = trainer.run()
    extra = {
        "wall_s": time.perf_counter() - t0,
        "opt_state_bytes": opt_state_bytes(trainer.opt),
        "step_ms": step_ms(out),
        "adapter_bytes": (out / "adapter.safetensors").stat().st_size
        if (out / "adapter.safetensors").is_file()
        else None,
        "model_bytes": (out / "model.safetensors").stat().st_size,
        "val_acc": 1 - summary["final_val_err"],
    }
    (out / "extra.json").write_text(json.dumps(extra))
    return {**summary, **extra}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--half-a", required=True, help="ImageFolder tree of the base's classes")
    ap.add_argument("--half-b", required=True, help="ImageFolder tree of the transfer classes")
    ap.add_argument("--model", default="mlp")
    ap.add_argument("--model-arg", action="append", default=[], help="KEY=JSON")
    ap.add_argument("--base-epochs", type=int, default=8)
    ap.add_argument("--base-lr", type=float, default=0.02)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", action="append", default=[], help="METHOD=LR (defaults below)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--base-limit-train", type=int, default=None, help="default: --limit-train")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--work", default="/tmp/transfer")
    ap.add_argument("--name", default="transfer_mlp")
    ap.add_argument(
        "--time-steps", type=int, default=0,
        help="then time N steps of each method, interleaved in one process (step_ms_clean)",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(1)
    lrs = {"probe": 0.05, "ss-act+head": 0.05, "ssf+head": 0.05, "full": 0.01, "scratch": 0.02}
    lrs.update({k: float(v) for k, v in (x.split("=", 1) for x in args.lr)})
    margs = {k: json.loads(v) for k, v in (x.split("=", 1) for x in args.model_arg)}
    work = Path(args.work) / args.name
    limits = {"limit_train": args.limit_train, "limit_test": args.limit_test}
    common = dict(
        model=args.model, model_args=margs, device="cpu", batch_size=args.batch_size,
        augment=False, momentum=0.9, schedule="cosine", **limits,
    )  # fmt: skip
    t_start = time.perf_counter()
    base_limit = args.base_limit_train or args.limit_train
    data_a = load_data(args.half_a, limit_train=base_limit, limit_test=args.limit_test)
    data_b = load_data(args.half_b, **limits)
    print(f"half A {data_a}\nhalf B {data_b}", flush=True)
    base_cfg = TrainConfig(
        **{**common, "limit_train": base_limit}, shift="none", scale="none",
        epochs=args.base_epochs, lr=args.base_lr, seed=0, name="base",
    )  # fmt: skip
    base = train_one(base_cfg, work / "base", data_a)
    base_file = work / "base" / "model.safetensors"
    print(f"base: acc {base['val_acc']:.4f} on classes A, {base['wall_s']:.0f} s", flush=True)
    rows, cfgs = [], {}
    for method in args.methods:
        for seed in args.seeds:
            kw = {**common, "init_from": str(base_file), **METHODS[method]}
            cfg = TrainConfig(
                **kw, epochs=args.epochs, lr=lrs[method], seed=seed, ss_lr_mult=1.0,
                name=f"{method}_s{seed}",
            )  # fmt: skip
            cfgs.setdefault(method, cfg)
            r = train_one(cfg, work / cfg.name, data_b)
            r["method"] = method
            rows.append(r)
            print(
                f"{method:12s} seed {seed}: acc {r['val_acc']:.4f} trainable "
                f"{r['trainable_params']:,} ({100 * r['trainable_fraction']:.2f}%) "
                f"opt {r['opt_state_bytes'] / 1e6:.2f} MB step {r['step_ms']:.1f} ms "
                f"({r['wall_s']:.0f} s)",
                flush=True,
            )
            write(args, rows, base, lrs, time.perf_counter() - t_start)
    if args.time_steps:
        clean = time_steps(cfgs, data_b, args.time_steps, work / "timing")
        for r in rows:
            r["step_ms_clean"] = clean[r["method"]]
        write(args, rows, base, lrs, time.perf_counter() - t_start)


def time_steps(cfgs: dict[str, TrainConfig], data, n: int, work: Path) -> dict[str, float]:
    """Median ms per optimiser step of each method on one fixed batch: 5 rounds of ``n``
    steps, the methods interleaved in each round, so that a load from elsewhere on the
    machine hits them all alike."""
    trainers = {m: Trainer(c, work / m, data=data) for m, c in cfgs.items()}
    batches = {m: next(iter(t.train_loader)) for m, t in trainers.items()}
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for rnd in range(6):
        for m, t in trainers.items():
            t0 = time.perf_counter()
            for _ in range(n if rnd else 2):  # round 0: warm-up
                t._train_step([batches[m]])
            if rnd:
                times[m].append(1000 * (time.perf_counter() - t0) / n)
    out = {m: statistics.median(v) for m, v in times.items()}
    print("step ms (interleaved):", {m: round(v, 1) for m, v in out.items()}, flush=True)
    return out


def write(args, rows, base, lrs, wall) -> None:
    table = []
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        accs = [r["val_acc"] for r in rs]
        table.append(
            {
                "method": method,
                "lr": lrs[method],
                "seeds": [r["seed"] for r in rs],
                "acc_mean": statistics.mean(accs),
                "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "accs": accs,
                "trainable_params": rs[0]["trainable_params"],
                "total_params": rs[0]["total_params"],
                "trainable_pct": 100 * rs[0]["trainable_fraction"],
                "opt_state_bytes": rs[0]["opt_state_bytes"],
                "adapter_bytes": rs[0]["adapter_bytes"],
                "model_bytes": rs[0]["model_bytes"],
                "step_ms_median": statistics.median(r["step_ms"] for r in rs),
                "step_ms_clean": rs[0].get("step_ms_clean"),
            }
        )
    meta = {
        "command": "python benchmarks/transfer.py " + " ".join(_argv()),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
        + f", {os.cpu_count()} cores (1 thread used), torch {torch.__version__}",
        "model": args.model,
        "base": {
            "epochs": args.base_epochs,
            "lr": args.base_lr,
            "val_acc": base["val_acc"],
            "train_images": args.base_limit_train or args.limit_train or "all",
        },
        "epochs": args.epochs,
        "train_images": args.limit_train or "all",
        "test_images": args.limit_test or "all",
        "batch_size": args.batch_size,
        "wall_s": wall,
    }
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({**meta, "table": table}, indent=1) + "\n")
    with open(out / f"{args.name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, [k for k in table[0] if k not in ("seeds", "accs")])
        w.writeheader()
        for row in table:
            w.writerow({k: v for k, v in row.items() if k in w.fieldnames})
    (out / f"{args.name}.md").write_text(markdown(table, meta))
    figure(args.name, table, meta)


def markdown(table: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The table for docs/finetune.md."""
    lines = [
        "| method | LR | test acc. (mean ± std) | seeds | trainable | optimiser state | "
        "adapter | step in training (median) | step, interleaved |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for t in table:
        adapter = f"{t['adapter_bytes'] / 1e3:.1f} KB" if t["adapter_bytes"] else "-"
        lines.append(
            f"| {t['method']} | {t['lr']:g} | {100 * t['acc_mean']:.2f} ± {100 * t['acc_std']:.2f}% "
            f"| {len(t['seeds'])} | {t['trainable_params']:,} ({t['trainable_pct']:.2f}%) "
            f"| {t['opt_state_bytes'] / 1e3:,.1f} KB | {adapter} | {t['step_ms_median']:.0f} ms "
            f"| {_ms(t['step_ms_clean'])} |"
        )
    return "\n".join(lines) + "\n"


def _argv() -> list[str]:
    import sys

    return sys.argv[1:]


def figure(name: str, table: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = [t["method"] for t in table]
    ax.bar(names, [100 * t["acc_mean"] for t in table],
           yerr=[100 * t["acc_std"] for t in table], capsize=4, color="#4c72b0")  # fmt: skip
    ax.set_ylabel("test accuracy, classes 5-9 (%)")
    lo = min(100 * t["acc_mean"] for t in table)
    ax.set_ylim(max(0, lo - 10), None)
    ax.set_title(f"{meta['model']}: transfer A->B, {len(table[0]['seeds'])} seeds")
    bx.bar(names, [t["trainable_params"] for t in table], color="#dd8452")
    bx.set_yscale("log")
    bx.set_ylabel("trainable parameters")
    for a in (ax, bx):
        a.tick_params(axis="x", labelrotation=20)
    fig.tight_layout()
    out = ROOT / "docs" / "results"
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


if __name__ == "__main__":
    main()

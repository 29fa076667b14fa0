"""Shift/scale values per epoch from run folders' snapshots, as one JSON file.

    python docs/results/science/extract.py OUT/q-collapse-mlp ... -o docs/results/science/snapshots.json

For each run: {site.param: [mean value after epoch 0 (init), 1, 2, ...]} (layer-wise
parameters are one number; other modes give the mean), the run's config essentials and, for
probed runs, "steps": {site: [step_after per probed epoch]} (the effective step size of the
weight layer after each site: mean |dW|/|W| per optimiser step over the epoch);
under "throughput", per recipe folder, the training images/s of every epoch (median, min,
max, the epochs counted) as metrics.jsonl recorded them.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from safetensors.torch import load_file


def run_values(run: Path) -> dict:
    config = json.loads((run / "config.json").read_text())
    series: dict[str, list[float]] = {}
    for snap in sorted((run / "snapshots").glob("epoch_*.safetensors")):
        for key, t in load_file(str(snap)).items():
            series.setdefault(key, []).append(float(t.float().mean()))
    steps: dict[str, list] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("type") == "probe" and "step_after" in row:
            steps.setdefault(row["site"], []).append(row["step_after"])
    keep = ("variant", "tag", "lr", "seed", "ss_lr_mult", "ss_warmup_epochs", "include", "exclude")
    out = {"config": {k: config.get(k) for k in keep}, "values": series}
    if steps:
        out["steps"] = steps
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("-o", "--output", type=Path, required=True)
    args = ap.parse_args()
    out: dict = {"throughput": {}}
    for folder in args.folders:
        speeds = []
        for run in sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").is_file()):
            out[f"{folder.name}/{run.name}"] = run_values(run)
            for line in (run / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if row.get("type") == "epoch" and row.get("images_per_s"):
                    speeds.append(row["images_per_s"])
        if speeds:
            out["throughput"][folder.name] = {
                "train_images_per_s_median": statistics.median(speeds),
                "min": min(speeds), "max": max(speeds), "epochs": len(speeds),
            }  # fmt: skip
    args.output.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""CLI start-up: wall time of ``surgeon --help`` (and friends) beside ``python -c "import torch"``.

    python benchmarks/cli_startup.py               # a few seconds
    python benchmarks/cli_startup.py --runs 9

Each command runs as a fresh subprocess; the median of ``--runs`` runs is reported, after
one untimed warm-up run of each (the OS file cache). The targets are ``surgeon --help`` under
1 s on a 2-core machine, and ``surgeon insert allconv`` within ``import torch`` + 2 s. Writes benchmarks/results/cli_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

COMMANDS = {
    "surgeon --help": [sys.executable, "-m", "surgeon", "--help"],
    "surgeon train --help": [sys.executable, "-m", "surgeon", "train", "--help"],
    "surgeon --version": [sys.executable, "-m", "surgeon", "--version"],
    "surgeon insert allconv --json": [
        sys.executable,
        "-m",
        "surgeon",
        "insert",
        "allconv",
        "--json",
    ],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "python -c 'pass'": [sys.executable, "-c", "pass"],
}


def wall_times(cmd: list[str], runs: int) -> list[float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm-up, untimed
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "cli_startup.json"
    )
    args = parser.parse_args()
    results = {}
    for name, cmd in COMMANDS.items():
        times = wall_times(cmd, args.runs)
        results[name] = {"median_s": round(statistics.median(times), 3), "runs_s": times}
        print(f"{name:28s} median {statistics.median(times):6.3f} s")
    doc = {
        "benchmark": "cli_startup",
        "runs": args.runs,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": metadata.version("torch"),
        "typer": metadata.version("typer"),
        "results": {
            k: {**v, "runs_s": [round(t, 3) for t in v["runs_s"]]} for k, v in results.items()
        },
        "target_s": 1.0,
        "surgeon_help_under_target": results["surgeon --help"]["median_s"] < 1.0,
        "insert_allconv_minus_import_torch_s": round(
            results["surgeon insert allconv --json"]["median_s"]
            - results["python -c 'import torch'"]["median_s"],
            3,
        ),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""The README's first command, timed: `surgeon train --recipe quick` on the embedded sample.

    python benchmarks/quick_start.py [--out FILE]

Runs the recipe into a temporary folder, records the wall time, the machine's load average
before and after (the 2-core machine is often shared), and each run's validation error.
Writes benchmarks/results/quick_start.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "quick_start.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        load0 = os.getloadavg()
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "surgeon",
            "train",
            "--recipe",
            "quick",
            "--out",
            tmp,
            "--quiet",
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        load1 = os.getloadavg()
        results = json.loads(next(Path(tmp).rglob("results.json")).read_text())
    import torch

    doc = {
        "command": "surgeon train --recipe quick",
        "wall_s": round(wall, 1),
        "load_avg_1min_before_after": [round(load0[0], 2), round(load1[0], 2)],
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
        },
        "runs": [
            {k: r.get(k) for k in ("name", "variant", "best_val_err", "final_val_err", "status")}
            for r in results["runs"]
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()

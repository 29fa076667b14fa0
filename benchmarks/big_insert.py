"""Big models from the CLI: `surgeon insert` time and peak memory beside timm's build alone.

    python benchmarks/big_insert.py [--models vit_huge_patch14_224 ...] [--out FILE]

Each measurement is a fresh process (peak RSS is that process's own `ru_maxrss`; wall and
CPU seconds, since a shared machine stretches wall time):
- `build`: `timm.create_model(name)` with real weights, nothing else;
- `insert --json`: `surgeon insert timm:NAME --shift layer --scale layer --json` (analysed on
  the meta device above --check-limit, no identity check);
- `insert -o`: the same with `-o DIR` (real weights built once, inserted in place, saved).
Writes benchmarks/results/big_insert.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "big_insert.json"
PEAK = "import resource; print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"


def _cpu_children() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _run(code: str) -> dict:
    t0, c0 = time.perf_counter(), _cpu_children()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1:], "wall_s": round(wall, 2)}
    peak = next(line for line in out.stdout.splitlines() if line.startswith("PEAK"))
    return {
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "peak_rss_gib": round(int(peak.split()[1]) / 2**20, 3),
    }


def measure(name: str, folder: Path) -> dict:
    cli = "from surgeon_cli.app import main; rc = main({argv!r}); assert rc == 0, rc\n"
    argv = ["insert", f"timm:{name}", "--shift", "layer", "--scale", "layer", "--json"]
    row = {
        "build": _run(f"import timm; m = timm.create_model({name!r})\n{PEAK}"),
        "insert --json": _run(cli.format(argv=argv) + PEAK),
        "insert -o": _run(cli.format(argv=[*argv[:-1], "-o", str(folder / name)]) + PEAK),
    }
    weights = folder / name / "model.safetensors"
    row["weights_gib"] = round(weights.stat().st_size / 2**30, 3) if weights.exists() else None
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["vit_huge_patch14_224"])
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    out = {
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_avg_1min": round(os.getloadavg()[0], 2),
        },  # fmt: skip
        "command": "python benchmarks/big_insert.py " + " ".join(sys.argv[1:]),
        "models": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            out["models"][name] = row = measure(name, Path(tmp))
            print(name, json.dumps(row))
    import torch

    out["machine"]["torch"] = torch.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

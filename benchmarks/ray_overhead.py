"""The cost of Ray per run: a 2-run grid with and without ``--backend ray`` (issue 18).

Two measurements, written to ``benchmarks/results/ray_overhead.json``:

- ``cli``: wall time of ``surgeon train --recipe R2 ...`` (two runs of the quick recipe) locally
  (one after the other) and with ``--backend ray`` (a local Ray instance started and stopped
  by the command; by default each run takes a local run's threads, so on 2 cores the runs go
  one after the other; with ``--cpus-per-run 1`` side by side, one core each);
- ``per_run``: one run at a time on a warm local Ray instance (``ray.init(num_cpus=2)``), one
  thread, against the same run in-process with one thread: the first task pays for a new
  worker process (import torch), the later ones reuse it.

    python benchmarks/ray_overhead.py [--epochs 1] [--limit-train 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RECIPE = """name = "quick2"
[base]
model = "allconv"
model_args = { width = 0.25 }
data = "sample"
batch_size = 128
augment = false
device = "cpu"
[grid]
variant = ["plain", "shift-layer+scale-layer"]
lr = [0.04]
seed = [0]
"""


def _cli(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "surgeon", "train", *args], capture_output=True, text=True
    )
    if proc.returncode:
        sys.exit(proc.stderr[-2000:])
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--limit-train", type=int, default=1000)
    ap.add_argument("--limit-test", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ray_overhead.json"))
    a = ap.parse_args()
    import ray
    import torch

    from surgeon.train import TrainConfig, train
    from surgeon.train.ray_backend import run_ray

    tmp = Path(tempfile.mkdtemp(prefix="ray-overhead-"))
    (tmp / "quick2.toml").write_text(RECIPE)
    common = ["--recipe", str(tmp / "quick2.toml"), "--epochs", str(a.epochs), "--limit-train",
              str(a.limit_train), "--limit-test", str(a.limit_test), "--quiet"]  # fmt: skip
    load = os.getloadavg()
    cli_local = _cli([*common, "--out", str(tmp / "local")])
    cli_ray = _cli([*common, "--backend", "ray", "--out", str(tmp / "ray")])
    cli_ray1 = _cli(
        [*common, "--backend", "ray", "--cpus-per-run", "1", "--out", str(tmp / "ray1")]
    )
    errs = {
        where: {
            r["name"]: r["final_val_err"]
            for r in json.loads((tmp / where / "quick2" / "results.json").read_text())["runs"]
        }
        for where in ("local", "ray", "ray1")
    }

    torch.set_num_threads(1)
    kw = {"model": "allconv", "model_args": {"width": 0.25}, "epochs": a.epochs, "device": "cpu",
          "limit_train": a.limit_train, "limit_test": a.limit_test, "augment": False}  # fmt: skip
    local, remote = [], []
    ray.init(
        num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING
    )
    try:
        for i in range(a.repeats):
            cfg = TrainConfig(**kw, seed=i)
            t0 = time.perf_counter()
            train(cfg, tmp / f"in-process-{i}")
            local.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            run_ray([cfg], tmp / f"ray-{i}")
            remote.append(time.perf_counter() - t0)
    finally:
        ray.shutdown()
    result = {
        "machine": {
            "cpus": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "load_avg_at_start": [round(x, 2) for x in load],
            "note": "2 cores shared with other jobs: times are noisy",
        },
        "run": {**kw, "batch_size": 128},
        "cli": {
            "command": "surgeon train --recipe quick2 (plain, shift-layer+scale-layer) "
            + " ".join(common[2:]) + " [--backend ray]",
            "local_s": round(cli_local, 2), "ray_s": round(cli_ray, 2),
            "ray_minus_local_s": round(cli_ray - cli_local, 2),
            "ray_cpus_per_run_1_s": round(cli_ray1, 2),
            "val_err": errs["local"], "same_val_err": errs["local"] == errs["ray"],
            "val_err_cpus_per_run_1": errs["ray1"],
        },
        "per_run": {
            "in_process_s": [round(x, 2) for x in local],
            "ray_task_s": [round(x, 2) for x in remote],
            "overhead_s": [round(r - lo, 2) for r, lo in zip(remote, local)],
            "note": "first: a new Ray worker (imports torch); later: a warm worker",
        },
    }  # fmt: skip
    Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
